"""Channel data sealed in batches (issue 13, SFTP: a 512 MiB upload), on a real OpenSSH server.

``connect.send_data`` seals the SSH_MSG_CHANNEL_DATA packets of a request itself under AES-GCM
(as paramiko's ``Packetizer.send_message`` seals one, a batch at a time, one socket write), and
leaves any other cipher to paramiko. What the server stores must be the bytes hashed, at every
range boundary, across key exchanges, and whatever the cipher.
"""

from __future__ import annotations

import sys

import paramiko
import pytest

from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import hash_file, object_relpath, verify_file
from tests.conftest import make_file
from tests.test_sftp_parallel import small_ranges  # noqa: F401  (a fixture)


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def _big(tmp_path, size: int, seed: int):
    """A file with random runs and zero runs that straddle the 256 KiB ranges and 255 KiB writes."""
    src = tmp_path / f"big{seed}.bin"
    data = make_file(src, size, seed=seed)
    cut = (256 << 10) - 777  # zeros across the first range boundary
    src.write_bytes(data[:cut] + bytes(5000) + data[cut + 5000 :])
    return src, *hash_file(src)


def _round_trip(pm, remote, store, src, oid, size, tmp_path):
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    verify_file(store / "objects" / object_relpath(oid), oid)  # the server's bytes, every boundary
    back = tmp_path / "back"
    back.write_bytes(b"")
    with Session() as s:
        assert pm.hook.fetch(remote=remote, oid=oid, dest=back, size=size, session=s)
    verify_file(back, oid)


def _channel_data_through_paramiko(monkeypatch) -> list[int]:
    """The sizes of channel data paramiko's ``Channel.send`` was given."""
    seen: list[int] = []
    orig = paramiko.Channel.send

    def send(self, s):
        seen.append(len(s))
        return orig(self, s)

    monkeypatch.setattr(paramiko.Channel, "send", send)
    return seen


@pytest.mark.parametrize("into", [True, False])
def test_a_range_upload_is_sealed_in_batches_and_arrives_whole(pm, sftp_remote, sftp_store, tmp_path, small_ranges,
                                                               monkeypatch, into):
    """Sealed into the batch (``encrypt_into``) or sealed apart and copied in (an older
    cryptography). Mutation-checked: with ``_aead_ready`` answering False, every packet goes
    through ``Channel.send`` and none is sealed here."""
    from jam_sftp import connect

    monkeypatch.setattr(connect, "SEAL_INTO", into)

    through_paramiko = _channel_data_through_paramiko(monkeypatch)
    before = connect.sealed_packets
    src, oid, size = _big(tmp_path, (3 << 20) + 4321, seed=41)
    _round_trip(pm, sftp_remote, sftp_store, src, oid, size, tmp_path)
    assert connect.sealed_packets - before >= size // (32 << 10)
    assert sum(through_paramiko) < 64 << 10  # a few small requests at most, no data


def test_one_connection_upload_is_sealed_and_arrives_whole(pm, sftp_remote, sftp_store, tmp_path):
    """The pipeline's path (one connection: no ranges) through the same sealing."""
    from jam_sftp import connect
    from tests.conftest_sshd import sftp_remote_for

    remote = sftp_remote_for(sftp_remote.url, name="one", connections=1)
    before = connect.sealed_packets
    src, oid, size = _big(tmp_path, (2 << 20) + 99, seed=42)
    _round_trip(pm, remote, sftp_store, src, oid, size, tmp_path)
    assert connect.sealed_packets - before >= size // (32 << 10)


def test_sealing_goes_on_across_key_exchanges(pm, sftp_remote, sftp_store, tmp_path, small_ranges, monkeypatch):
    """paramiko asks for new keys every REKEY_BYTES sent (512 MiB; here 1 MiB): the batches
    count what they send, the exchange happens between two batches, and the next batches are
    sealed with the new keys. Mutation-checked: without the rekey count in ``send_data`` no
    exchange is asked for by ``send_data`` (only by paramiko's next message of its own)."""
    from jam_sftp import connect

    monkeypatch.setattr(paramiko.Packetizer, "REKEY_BYTES", 1 << 20)
    rekeys = []
    orig = paramiko.Packetizer._trigger_rekey

    def trigger(self):
        rekeys.append(sys._getframe(1).f_code.co_name)  # who asked: send_data or paramiko
        return orig(self)

    monkeypatch.setattr(paramiko.Packetizer, "_trigger_rekey", trigger)
    before = connect.sealed_packets
    src, oid, size = _big(tmp_path, (6 << 20) + 1234, seed=43)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    verify_file(sftp_store / "objects" / object_relpath(oid), oid)
    # How many of the exchanges send_data asks for (rather than paramiko's own next message)
    # depends on how the ranges spread over the connections: at least one, never none (CI saw 2
    # of an expected 3 on a loaded machine).
    assert rekeys.count("send_data") >= 1, rekeys
    assert connect.sealed_packets - before >= size // (32 << 10)


def test_another_cipher_goes_through_paramiko(pm, sftp_remote, sftp_store, tmp_path, small_ranges, monkeypatch):
    """aes128-ctr with an HMAC: nothing is sealed here, paramiko sends it all. Mutation-checked:
    with ``_aead_ready`` not asking for AES-GCM, the ctr cipher has no ``encrypt`` (AttributeError)."""
    from jam_sftp import connect

    monkeypatch.setattr(connect, "PREFERRED_CIPHERS", ("aes128-ctr",))
    through_paramiko = _channel_data_through_paramiko(monkeypatch)
    before = connect.sealed_packets
    src, oid, size = _big(tmp_path, (2 << 20) + 5, seed=44)
    _round_trip(pm, sftp_remote, sftp_store, src, oid, size, tmp_path)
    assert connect.sealed_packets == before
    assert sum(through_paramiko) >= size


def test_a_closed_channel_stops_the_send(sshd, tmp_path):
    """send_data on a channel that closed raises EOFError (a lost connection), never loops."""
    from jam_sftp import connect

    conn = connect.open_connection(connect.resolve(sshd.alias), 30)
    try:
        chan = conn.sftp.sock
        chan.close()
        with pytest.raises((EOFError, OSError)):
            connect.send_data(chan, memoryview(b"x" * 100_000))
    finally:
        conn.close()


@pytest.mark.parametrize("cores, width", [(1, 2), (2, 2), (3, 3), (8, 4)])
def test_ranges_go_over_no_more_connections_than_cores(pm, sftp_remote, sftp_store, tmp_path, small_ranges,
                                                       monkeypatch, cores, width):
    """A pool of 4: the ranges of one object go over at most this machine's cores' worth of
    connections (at least 2), up and down. Mutation-checked: without the cap in
    ``range_width`` 4 are asked for on 1 or 2 cores."""
    from jam_sftp import parallel

    monkeypatch.setattr(parallel.os, "cpu_count", lambda: cores)
    wanted = []
    orig = parallel.on_connections

    def on_connections(pool, ops, work, want):
        wanted.append(want)
        return orig(pool, ops, work, want)

    monkeypatch.setattr(parallel, "on_connections", on_connections)
    src, oid, size = _big(tmp_path, (4 << 20) + 17, seed=45)
    _round_trip(pm, sftp_remote, sftp_store, src, oid, size, tmp_path)
    assert wanted == [width, width]

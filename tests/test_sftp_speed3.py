"""The client's copies on a big transfer (issue 13, SFTP), on a real OpenSSH server.

- A range's writes are packed whole (``transfer.write_request``): the source is read straight
  into the request behind its header and sent as views of it, never through paramiko's request
  path (which copied the data into a Message, out of it, behind its length, and once per channel
  packet for all that was left: ~2 MiB of copies per 255 KiB write).
- Each connection's channel buffer is a ``connect.ChunkPipe``: what arrives is kept as chunks,
  a read takes them whole (paramiko's array was copied out and memmoved down on every read).
"""

from __future__ import annotations

import os
import random
import struct

import paramiko
import pytest
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import CMD_WRITE

from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import hash_file, object_relpath, verify_file
from tests.conftest import make_file
from tests.test_sftp_parallel import small_ranges  # noqa: F401  (a fixture)


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def test_write_request_is_an_sftp_write_read_straight_from_the_file(tmp_path):
    from jam_sftp.transfer import write_request

    src = tmp_path / "src"
    data = os.urandom(300_000)
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        buf, view = write_request(b"HNDL7", fd, 1000, 255 * 1024)
        assert bytes(view) == data[1000 : 1000 + 255 * 1024], "differs"
        length, t, num, hlen = struct.unpack_from(">IBII", buf)
        assert (t, num, hlen) == (CMD_WRITE, 0, 5) and length == len(buf) - 4
        assert bytes(buf[13:18]) == b"HNDL7"
        offset, n = struct.unpack_from(">QI", buf, 18)
        assert (offset, n) == (1000, 255 * 1024) and len(buf) == 30 + n
        # the file ends first: the view says how much was read (the caller refuses it)
        buf, view = write_request(b"H", fd, 299_990, 100)
        assert bytes(view) == data[299_990:]
        assert struct.unpack_from(">I", buf)[0] == 4 + 1 + 4 + 4 + 1 + 8 + 4 + 10 - 4
    finally:
        os.close(fd)


def test_a_range_upload_sends_no_write_through_paramikos_request_path(pm, sftp_remote, sftp_store, tmp_path,
                                                                      small_ranges, monkeypatch):
    """Mutation-checked: with ``_write_ranges`` sending through ``Replies.send`` (paramiko's
    ``_async_request``) again, the count of writes there is not 0."""
    from jam_sftp.transfer import Replies

    through_paramiko = []
    packed = []
    orig_async = paramiko.SFTPClient._async_request
    orig_packed = Replies.send_request

    def async_request(self, fileobj, t, *args):
        if t == CMD_WRITE:
            through_paramiko.append(t)
        return orig_async(self, fileobj, t, *args)

    def send_request(self, buf):
        packed.append(len(buf))
        return orig_packed(self, buf)

    monkeypatch.setattr(paramiko.SFTPClient, "_async_request", async_request)
    monkeypatch.setattr(Replies, "send_request", send_request)
    src = tmp_path / "big.bin"
    data = make_file(src, (3 << 20) + 4321, seed=11)
    src.write_bytes(data[: 1 << 20] + bytes(300_000) + data[(1 << 20) + 300_000 :])  # zeros too
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    verify_file(sftp_store / "objects" / object_relpath(oid), oid)
    assert through_paramiko == []
    assert len(packed) >= size // (255 * 1024)


def _pipe_ops(seed: int):
    rnd = random.Random(seed)
    ops = []
    for _ in range(300):
        if rnd.random() < 0.5:
            ops.append(("feed", rnd.randbytes(rnd.choice([1, 7, 4096, 65536, 255 * 1024]))))
        else:
            ops.append(("read", rnd.choice([1, 13, 4096, 65536, 255 * 1024, 1 << 20])))
    return ops


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunk_pipe_reads_what_paramikos_pipe_reads(seed):
    from jam_sftp.connect import ChunkPipe

    ours, theirs = ChunkPipe(), BufferedPipe()
    for op, arg in _pipe_ops(seed):
        if op == "feed":
            ours.feed(arg)
            theirs.feed(arg)
        elif len(theirs):
            assert ours.read(arg, 0) == theirs.read(arg, 0), "differs"
        assert len(ours) == len(theirs) and ours.read_ready() == theirs.read_ready()
    assert ours.empty() == theirs.empty(), "differs"
    with pytest.raises(PipeTimeout):
        ours.read(10, 0.0)
    ours.feed(b"last")
    ours.close()
    assert ours.read(100, 1) == b"last"
    assert ours.read(100, 1) == b""  # closed and empty: end of stream


def test_chunk_pipe_hands_whole_chunks_without_copying_them():
    """Mutation-checked: paramiko's BufferedPipe copies (its ``read`` returns a new object)."""
    from jam_sftp.connect import ChunkPipe

    pipe = ChunkPipe()
    chunks = [os.urandom(255 * 1024) for _ in range(8)]
    for c in chunks:
        pipe.feed(c)
    for c in chunks:
        assert pipe.read(len(c)) is c
    assert len(pipe) == 0


def test_every_connection_reads_through_a_chunk_pipe(pm, sftp_remote, sftp_store, tmp_path, small_ranges,
                                                     monkeypatch):
    """A big object fetched in ranges over several connections comes back whole, every reply read
    through ChunkPipe (mutation-checked: without the swap in SFTP.__init__ nothing is read there)."""
    from jam_sftp.connect import ChunkPipe

    reads = []
    orig = ChunkPipe._buffer_tobytes

    def spy(self, limit=None):
        out = orig(self, limit)
        reads.append(len(out))
        return out

    monkeypatch.setattr(ChunkPipe, "_buffer_tobytes", spy)
    src = tmp_path / "big.bin"
    make_file(src, (3 << 20) + 999, seed=12)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    reads.clear()
    back = tmp_path / "back"
    back.write_bytes(b"")
    with Session() as s:
        assert pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back, size=size, session=s) is True
    verify_file(back, oid)
    assert sum(reads) >= size


def _count_early_fsyncs(monkeypatch, bogus: bool = False) -> list:
    """Count the fsyncs a range upload asks for through ``Replies.send`` (the final one goes
    through the batch protocol's pipeline); ``bogus``: they name a handle the server never gave."""
    from jam_sftp.transfer import Replies

    early = []
    orig = Replies.send

    def send(self, t, *args):
        if args and args[0] == "fsync@openssh.com":
            early.append(t)
            if bogus:
                args = (args[0], b"no such handle")
        return orig(self, t, *args)

    monkeypatch.setattr(Replies, "send", send)
    return early


def test_a_range_upload_starts_its_writeback_before_the_end(pm, sftp_remote, sftp_store, tmp_path, small_ranges,
                                                            monkeypatch):
    """Mutation-checked: without the fsync every SYNC_EVERY bytes in ``_write_ranges`` no early
    fsync is asked for (the whole file was left dirty for the final fsync)."""
    monkeypatch.setattr(small_ranges, "SYNC_EVERY", 512 << 10)
    early = _count_early_fsyncs(monkeypatch)
    src = tmp_path / "big.bin"
    make_file(src, (3 << 20) + 77, seed=13)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    verify_file(sftp_store / "objects" / object_relpath(oid), oid)
    assert len(early) >= 3


def test_no_early_fsync_when_fsync_is_off(pm, sshd, sftp_store, tmp_path, small_ranges, monkeypatch):
    from tests.conftest_sshd import sftp_remote_for

    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", fsync=False)
    monkeypatch.setattr(small_ranges, "SYNC_EVERY", 512 << 10)
    early = _count_early_fsyncs(monkeypatch)
    src = tmp_path / "big.bin"
    make_file(src, (3 << 20) + 5, seed=14)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    verify_file(sftp_store / "objects" / object_relpath(oid), oid)
    assert early == []


def test_an_early_fsync_that_fails_fails_the_object(pm, sftp_remote, sftp_store, tmp_path, small_ranges,
                                                    monkeypatch):
    """The server refuses an early fsync: nothing is stored, the part is removed (every early
    fsync's status is checked like a write's; mutation-checked: its reply ignored, the object
    is stored)."""
    monkeypatch.setattr(small_ranges, "SYNC_EVERY", 512 << 10)
    early = _count_early_fsyncs(monkeypatch, bogus=True)
    src = tmp_path / "big.bin"
    make_file(src, (3 << 20) + 9, seed=15)
    oid, size = hash_file(src)
    from jam_core.errors import RemoteError

    with Session() as s, pytest.raises(RemoteError, match="cannot store"):  # the server's "no such handle"
        pm.hook.stash_many(remote=sftp_remote, items=[(oid, src, size)], session=s)
    assert early
    assert [p for p in (sftp_store / "objects").rglob("*") if p.is_file()] == []
    assert list((sftp_store / "tmp").iterdir()) == []

"""The SFTP upload/download protocol, written once (jam_sftp/batch.py): the single-object hooks
(``stash``/``fetch``, ``Ops.put``/``Ops.get``) and the batches run the same steps, against a real
OpenSSH server (tests/sshd.py). Faults are injected at the exact step they target."""

from __future__ import annotations

from pathlib import Path

import pytest
from paramiko.sftp import CMD_READ, CMD_WRITE

from jam_core import IntegrityError, Session, hash_file, object_relpath
from jam_core.manager import make_plugin_manager
from tests.conftest import make_file
from tests.conftest_sshd import sftp_remote_for

STREAMED = 9 * 1024 * 1024 + 5  # more than PIPELINED_MAX and more than one window of writes


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def stored(store: Path, oid: str) -> Path:
    return store / "objects" / object_relpath(oid)


def flip(path: Path, at: int) -> None:
    """Same size, some bytes flipped (root writes through the read-only mode)."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(16)
        f.seek(at)
        f.write(bytes(x ^ 0xFF for x in b))


def store(pm, remote, oid: str, src: Path, size: int, session: Session, hook: str):
    """Store through one of the two hooks; the error it reports for that object, or None."""
    if hook == "stash":
        try:
            assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=session) is True
        except IntegrityError as exc:
            return exc
        return None
    [(got, err)] = pm.hook.stash_many(remote=remote, items=[(oid, src, size)], session=session)
    assert got == oid
    return err


class Sent:
    """Requests the pipeline sends and the replies it gets: outstanding writes and reads."""

    def __init__(self, monkeypatch):
        from jam_sftp.pipeline import Pipeline

        self.writes_end = 0  # the furthest byte a write reached
        self.outstanding = {CMD_WRITE: 0, CMD_READ: 0}
        self.most = {CMD_WRITE: 0, CMD_READ: 0}
        send = Pipeline.send
        rec = self

        def counting_send(p, f, on_reply, t, *args):
            if t == CMD_WRITE:
                rec.writes_end = max(rec.writes_end, int(args[1]) + len(args[2]))
            if t in rec.outstanding:
                rec.outstanding[t] += 1
                rec.most[t] = max(rec.most[t], rec.outstanding[t])

                def replied(rt, msg, t=t):
                    rec.outstanding[t] -= 1
                    return on_reply(rt, msg)

                return send(p, f, replied, t, *args)
            return send(p, f, on_reply, t, *args)

        monkeypatch.setattr(Pipeline, "send", counting_send)


# -- verify = "read": the copy on the server is read back before it is renamed into place -------


@pytest.mark.parametrize("hook", ["stash", "stash_many"])
@pytest.mark.parametrize("size", [100_000, STREAMED], ids=["pipelined", "streamed"])
def test_verify_read_refuses_a_copy_damaged_on_the_server(pm, sftp_remote, sftp_store, tmp_path, monkeypatch,
                                                         size, hook):
    """The temporary copy is damaged (same size) after its close, before it is read back: the
    object is refused, nothing is renamed into place, the part is removed.
    Mutation-checked against the hash comparison in Uploads._verified."""
    from jam_sftp.batch import Uploads

    remote = sftp_remote_for(sftp_remote.url, verify="read")
    src = tmp_path / "f"
    make_file(src, size, seed=11)
    oid, size = hash_file(src)
    orig = Uploads._verify
    damaged = []

    def damage_then_verify(self, f):
        flip(Path(f.tmp), size // 2)  # the server is this machine: its path is ours
        damaged.append(f.tmp)
        return orig(self, f)

    monkeypatch.setattr(Uploads, "_verify", damage_then_verify)
    with Session() as s:
        err = store(pm, remote, oid, src, size, s, hook)
    assert damaged
    assert isinstance(err, IntegrityError) and "read back" in str(err), err
    assert not stored(sftp_store, oid).exists()
    assert list((sftp_store / "tmp").iterdir()) == []


# -- the source changes while it streams ----------------------------------------------------------


@pytest.mark.parametrize("hook", ["stash", "stash_many"])
@pytest.mark.parametrize("change", ["grows", "shrinks", "rewritten"])
def test_source_changed_mid_stream_is_refused_and_no_byte_past_the_size_is_sent(
        pm, sftp_remote, sftp_store, tmp_path, monkeypatch, change, hook):
    """The moment the server acknowledges the first write of a large object, its source grows,
    shrinks or has its tail rewritten. The upload is refused (content changed), nothing is
    renamed into place, the part is removed, and no write ever reaches past the size.
    Mutation-checked against the end-of-source checks in Uploads._send_writes (growth sent,
    or the hash comparison removed)."""
    src = tmp_path / "f"
    make_file(src, STREAMED, seed=3)
    oid, size = hash_file(src)
    sent = Sent(monkeypatch)
    acted = []

    def progress(n: int) -> None:
        if acted:
            return
        acted.append(n)
        if change == "grows":
            with open(src, "ab") as f:
                f.write(b"more" * 100_000)
        elif change == "shrinks":
            with open(src, "r+b") as f:
                f.truncate(size // 2)
        else:
            flip(src, size - 5000)

    with Session(progress=progress) as s:
        err = store(pm, sftp_remote, oid, src, size, s, hook)
    assert acted
    assert isinstance(err, IntegrityError) and "changed while it was being stored" in str(err), err
    assert sent.writes_end <= size
    assert not stored(sftp_store, oid).exists()
    assert list((sftp_store / "tmp").iterdir()) == []


# -- a server without posix-rename: the old object is replaced, never trusted -------------------


@pytest.mark.parametrize("hook", ["stash", "stash_many"])
@pytest.mark.parametrize("size", [100_000, STREAMED], ids=["pipelined", "streamed"])
def test_without_posix_rename_a_damaged_object_is_replaced(pm, sftp_remote, sftp_store, tmp_path, monkeypatch,
                                                          size, hook):
    """A plain SFTP rename refuses to replace; the existing (damaged, same-size) object is then
    removed and the verified upload renamed into place.
    Mutation-checked against the remove-and-rename-again branch of Uploads._renamed."""
    from jam_sftp.transfer import Ops

    init = Ops.__init__

    def plain_rename(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.posix_rename = False

    monkeypatch.setattr(Ops, "__init__", plain_rename)
    src = tmp_path / "f"
    data = make_file(src, size, seed=21)
    oid, size = hash_file(src)
    with Session() as s:
        assert store(pm, sftp_remote, oid, src, size, s, hook) is None
    flip(stored(sftp_store, oid), 1000)
    with Session() as s:
        assert store(pm, sftp_remote, oid, src, size, s, hook) is None
    assert stored(sftp_store, oid).read_bytes() == data
    assert list((sftp_store / "tmp").iterdir()) == []


# -- one object of any size streams through a bounded window -------------------------------------


def test_a_large_object_streams_through_a_bounded_window(pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """Up and down through the single-object hooks (a batch of one): never more than the window
    of writes or reads in flight, so a large file is never held whole in memory.
    Mutation-checked against the INFLIGHT bound in Uploads._send_writes and the READ_INFLIGHT
    bound in Pipeline.read_window."""
    from jam_sftp.transfer import INFLIGHT, READ_INFLIGHT

    src = tmp_path / "f"
    data = make_file(src, 3 * STREAMED, seed=8)
    oid, size = hash_file(src)
    sent = Sent(monkeypatch)
    back = tmp_path / "back"
    back.write_bytes(b"")
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s) is True
        assert pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back, size=size, session=s) is True
    assert 1 < sent.most[CMD_WRITE] <= INFLIGHT
    assert 1 < sent.most[CMD_READ] <= READ_INFLIGHT + 1  # and the read past the end
    assert back.read_bytes() == data

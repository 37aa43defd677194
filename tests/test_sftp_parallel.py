"""Several connections for one transfer (plugins/jam_sftp/parallel.py), on a real OpenSSH server:
a big object in ranges over several connections (up and down), a batch spread over free
connections; a connection that dies mid-range or mid-batch, a server that answers short reads,
a source that changes mid-upload, an object of another size. Thresholds are made small here so
that a few MiB take the same paths as a GiB."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from jam_core.errors import IntegrityError, JamError, RemoteError
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import hash_file, object_relpath, verify_file
from jam_core.stub import XATTR, StubRecord
from tests.conftest import make_file
from tests.conftest_sshd import sftp_remote_for
from tests.test_sftp_cli import jam, sftp_root
from tests.test_sftp_safety import small_disk  # noqa: F401  (a fixture)

HELPER = "jam-sftp"  # the name of parallel.on_connections' helper threads


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


@pytest.fixture
def small_ranges(monkeypatch):
    """Ranges of 256 KiB for objects from 1 MiB; the caller's thread takes no range before a
    helper connection has taken one, and helpers no second one before the caller took one (so
    both surely work, whatever the timing)."""
    from jam_sftp import parallel

    monkeypatch.setattr(parallel, "RANGE_MIN", 1 << 20)
    monkeypatch.setattr(parallel, "CHUNK", 256 << 10)
    monkeypatch.setattr(parallel, "LEAD", 1 << 20)
    orig_take = parallel.Ranges.take

    def take(self):
        helper_took = self.__dict__.setdefault("_test_gate", threading.Event())  # one gate per object
        main_took = self.__dict__.setdefault("_test_gate_main", threading.Event())
        if threading.current_thread().name != HELPER:
            assert helper_took.wait(60), "no helper connection took a range"
        elif helper_took.is_set() and not self.stopped:  # a helper's second range waits for the caller's first
            assert main_took.wait(60), "the caller's connection took no range"
        got = orig_take(self)
        if got is not None:
            (helper_took if threading.current_thread().name == HELPER else main_took).set()
        return got

    monkeypatch.setattr(parallel.Ranges, "take", take)
    return parallel


def objects_in(store: Path) -> list[Path]:
    return [p for p in (store / "objects").rglob("*") if p.is_file()]


def die_after(parallel, monkeypatch, name: str, requests: int):
    """A helper connection's transport is closed after it sent ``requests`` requests of its
    ranges (``name``: ``_write_ranges`` or ``_read_ranges``): that connection dies mid-range."""
    orig = getattr(parallel, name)
    died = threading.Event()

    def wrapped(ops, *args, **kw):
        if threading.current_thread().name == HELPER and not died.is_set():
            send, send_request = ops.r.send, ops.r.send_request
            count = [0]

            def one_more():
                count[0] += 1
                if count[0] > requests:
                    died.set()
                    ops.conn.transport.close()

            def dying(t, *a):
                one_more()
                return send(t, *a)

            def dying_request(buf):  # a range's writes, packed whole (transfer.write_request)
                one_more()
                return send_request(buf)

            ops.r.send = dying
            ops.r.send_request = dying_request
        return orig(ops, *args, **kw)

    monkeypatch.setattr(parallel, name, wrapped)
    return died


# -- a big object in ranges ------------------------------------------------------------------------


def test_ranges_up_and_down_over_several_connections(pm, sftp_remote, sftp_store, tmp_path, small_ranges,
                                                     monkeypatch):
    used: set[int] = set()
    for name in ("_write_ranges", "_read_ranges"):
        orig = getattr(small_ranges, name)

        def spy(ops, *a, _orig=orig, **kw):
            used.add(id(ops.conn))
            return _orig(ops, *a, **kw)

        monkeypatch.setattr(small_ranges, name, spy)
    src = tmp_path / "big.bin"
    data = make_file(src, (3 << 20) + 12345, seed=1)
    data = data[: 1 << 20] + bytes(1 << 20) + data[2 << 20:]  # a run of zero blocks: a hole when fetched
    src.write_bytes(data)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    assert len(used) >= 2
    obj = sftp_store / "objects" / object_relpath(oid)
    verify_file(obj, oid)
    assert obj.stat().st_mode & 0o777 == 0o444
    assert list((sftp_store / "tmp").iterdir()) == []
    used.clear()
    back = tmp_path / "back"
    back.write_bytes(b"old content")
    with Session() as s:
        assert pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back, size=size, session=s) is True
    assert len(used) >= 2
    verify_file(back, oid)
    assert back.stat().st_size == size
    assert back.stat().st_blocks * 512 < size - (512 << 10)  # the zero MiB stayed a hole
    # the batch hooks take the same path for their big objects
    back.unlink()
    back.write_bytes(b"")
    with Session() as s:
        assert dict(pm.hook.fetch_many(remote=sftp_remote, items=[(oid, back, size)], session=s)) == {oid: True}
    verify_file(back, oid)


def test_ranges_with_verify_read(pm, sshd, sftp_store, tmp_path, small_ranges):
    """``verify = "read"``: the part written over several connections is read back and re-hashed
    on the caller's connection before the rename."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", verify="read")
    src = tmp_path / "big.bin"
    make_file(src, (2 << 20) + 3, seed=8)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    verify_file(sftp_store / "objects" / object_relpath(oid), oid)
    assert list((sftp_store / "tmp").iterdir()) == []


def test_an_absent_object_is_false_not_an_error(pm, sftp_remote, tmp_path, small_ranges):
    back = tmp_path / "back"
    back.write_bytes(b"")
    oid = "b3:" + "ab" * 32
    with Session() as s:
        assert pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back, size=3 << 20, session=s) is False


@pytest.mark.parametrize("where", ["upload", "download"])
def test_a_connection_dying_mid_range_leaves_nothing_partial(runner, tmp_path, sshd, sftp_store, monkeypatch,
                                                            small_ranges, where):
    """One helper connection dies in the middle of its range: the command fails with one line
    (connection lost), the file stays local (upload) or the stub stays (download), no object
    appears under its final name and no part is left behind. Mutation-checked against
    ``raise errors[0]`` in on_connections."""
    tree = sftp_root(runner, tmp_path, sshd, sftp_store, monkeypatch)
    data = make_file(tree / "big.bin", (4 << 20) + 7, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        if where == "download":
            jam(runner, "stash", "big.bin")
            rec = StubRecord.unpack(os.getxattr(tree / "big.bin", XATTR))
            died = die_after(small_ranges, mp, "_read_ranges", 1)
            res = jam(runner, "checkout", "big.bin", ok=False)
        else:
            died = die_after(small_ranges, mp, "_write_ranges", 1)
            res = jam(runner, "stash", "big.bin", ok=False)
    assert died.is_set(), (res.output, res.stderr)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "lost during transfer" in res.stderr, res.stderr
    if where == "upload":
        assert (tree / "big.bin").read_bytes() == data, "the file stays local, unchanged"
        with pytest.raises(OSError):
            os.getxattr(tree / "big.bin", XATTR)
        assert objects_in(sftp_store) == []
    else:
        assert StubRecord.unpack(os.getxattr(tree / "big.bin", XATTR)).oid == rec.oid, "the stub stays"
        assert [p.name for p in (tree).iterdir() if p.name not in (".jam", "big.bin")] == []
    assert list((sftp_store / "tmp").iterdir()) == []
    # again, with nothing injected: it works
    jam(runner, "checkout", "big.bin") if where == "download" else jam(runner, "stash", "big.bin")
    if where == "download":
        assert (tree / "big.bin").read_bytes() == data, "differs"


def test_short_reads_are_asked_again(pm, sftp_remote, sftp_store, tmp_path, small_ranges, monkeypatch):
    """A server that answers reads with fewer bytes than asked (allowed by the protocol): the rest
    is asked for again. Mutation-checked against the re-request in _read_ranges."""
    src = tmp_path / "big.bin"
    make_file(src, (2 << 20) + 99, seed=4)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    orig = small_ranges._data
    shortened = [0]

    def short(msg):
        data = orig(msg)
        if len(data) > 1000 and shortened[0] < 6:
            shortened[0] += 1
            return data[: len(data) // 3]
        return data

    monkeypatch.setattr(small_ranges, "_data", short)
    back = tmp_path / "back"
    back.write_bytes(b"")
    with Session() as s:
        assert pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back, size=size, session=s) is True
    assert shortened[0] == 6
    verify_file(back, oid)


def test_source_changed_mid_upload_is_never_stored(pm, sftp_remote, sftp_store, tmp_path, small_ranges, monkeypatch):
    """The source changes after the first range was sent: what was sent does not hash to the id,
    so nothing is renamed into place and the part is removed. Mutation-checked against the hash
    comparison in put_ranges."""
    src = tmp_path / "big.bin"
    make_file(src, (3 << 20) + 1, seed=5)
    oid, size = hash_file(src)
    orig = small_ranges.Ranges.deliver
    changed = []

    def deliver(self, offset, data):
        if not changed:
            changed.append(offset)
            with open(src, "r+b") as f:
                f.seek(size - 10)
                f.write(b"X" * 10)
        return orig(self, offset, data)

    monkeypatch.setattr(small_ranges.Ranges, "deliver", deliver)
    with Session() as s, pytest.raises(IntegrityError):
        pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    assert objects_in(sftp_store) == []
    assert list((sftp_store / "tmp").iterdir()) == []
    # the batch hook: that object's failure, reported for it
    with Session() as s:
        out = dict(pm.hook.stash_many(remote=sftp_remote, items=[(oid, src, size)], session=s))
    assert isinstance(out[oid], IntegrityError)
    assert objects_in(sftp_store) == []


@pytest.mark.parametrize("change", ["longer", "shorter"])
@pytest.mark.parametrize("fstat", ["sizes", "no sizes"])
def test_an_object_of_another_size_is_refused(pm, sftp_remote, sftp_store, tmp_path, small_ranges, monkeypatch,
                                              change, fstat):
    """Never more than the size, never less: with or without a size from the server's fstat.
    "no sizes" is mutation-checked against the read past the end in get_ranges (longer) and the
    end-of-file check in _read_ranges (shorter)."""
    src = tmp_path / "big.bin"
    make_file(src, (2 << 20) + 5, seed=6)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=src, size=size, session=s)
    obj = sftp_store / "objects" / object_relpath(oid)
    obj.chmod(0o644)
    with open(obj, "r+b") as f:
        if change == "longer":
            f.seek(0, 2)
            f.write(b"more")
        else:
            f.truncate(size - 300_000)
    if fstat == "no sizes":
        monkeypatch.setattr(small_ranges, "_fstat_size", lambda *a: None)
    back = tmp_path / "back"
    back.write_bytes(b"")
    with Session() as s, pytest.raises(IntegrityError):
        pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back, size=size, session=s)


# -- a batch spread over connections ---------------------------------------------------------------


@pytest.fixture
def spread(monkeypatch):
    """One more connection per 4 objects; the caller's pipeline starts nothing before a helper
    has taken an object, and the helpers take no second one before the caller took one."""
    from jam_sftp import parallel, pipeline

    monkeypatch.setattr(parallel, "SPREAD_FILES", 4)
    monkeypatch.setattr(parallel, "SPREAD_BYTES", 1)
    orig_take = pipeline.Feed.take

    def take(self, fits, shard=0):
        heads = [q[-1] for q in self._queues if q]
        if not heads or not heads[0].oid:  # empty, or a run's directory fsyncs (sync_dirs)
            return orig_take(self, fits, shard)
        helper_took = self.__dict__.setdefault("_test_gate", threading.Event())  # one gate per batch
        main_took = self.__dict__.setdefault("_test_gate_main", threading.Event())
        if threading.current_thread().name != HELPER:
            assert helper_took.wait(60), "no helper connection took an object"
        elif helper_took.is_set():  # a helper's second object waits for the caller's first
            assert main_took.wait(60), "the caller's connection took no object"
        got = orig_take(self, fits, shard)
        if got is not None:
            (helper_took if threading.current_thread().name == HELPER else main_took).set()
        return got

    monkeypatch.setattr(pipeline.Feed, "take", take)
    return parallel


def test_a_batch_is_spread_over_connections(pm, sftp_remote, sftp_store, tmp_path, spread, monkeypatch):
    from jam_sftp import batch

    used: set[int] = set()
    for cls in (batch.Uploads, batch.Downloads):
        orig = cls.start

        def start(self, f, _orig=orig):
            used.add(id(self.ops.conn))
            return _orig(self, f)

        monkeypatch.setattr(cls, "start", start)
    paths = [tmp_path / "src" / f"f{i}" for i in range(40)]
    for i, p in enumerate(paths):
        make_file(p, 70_000 + i, seed=i)
    items = [(*hash_file(p), p) for p in paths]
    items = [(oid, p, size) for oid, size, p in items]
    with Session() as s:
        out = dict(pm.hook.stash_many(remote=sftp_remote, items=items, session=s))
    assert all(v is None for v in out.values()), out
    assert len(used) >= 2
    for oid, _, _ in items:
        verify_file(sftp_store / "objects" / object_relpath(oid), oid)
    used.clear()
    back = [(oid, tmp_path / "back" / p.name, size) for oid, p, size in items]
    (tmp_path / "back").mkdir()
    for _, d, _ in back:
        d.write_bytes(b"")
    with Session() as s:
        out = dict(pm.hook.fetch_many(remote=sftp_remote, items=back, session=s))
    assert all(v is True for v in out.values()), out
    assert len(used) >= 2
    for oid, d, _ in back:
        verify_file(d, oid)


def test_a_helper_dying_mid_batch_fails_the_batch_and_leaves_only_whole_objects(
        pm, sftp_remote, sftp_store, tmp_path, spread, monkeypatch):
    """A helper connection dies while its objects are in flight: the batch raises one
    RemoteError (connection lost), every object under its final name is whole, and what is
    left in tmp/ is jam's own parts. Mutation-checked against ``raise errors[0]``."""
    from jam_core.fs import part_is_stale  # noqa: F401  (parts are named by fs.part_name)
    from jam_sftp import batch

    orig = batch.Uploads.start
    died = threading.Event()

    def start(self, f):
        orig(self, f)
        if threading.current_thread().name == HELPER and not died.is_set():
            died.set()
            self.flush()
            self.ops.conn.transport.close()

    monkeypatch.setattr(batch.Uploads, "start", start)
    paths = [tmp_path / "src" / f"f{i}" for i in range(24)]
    for i, p in enumerate(paths):
        make_file(p, 70_000 + i, seed=i)
    items = [(oid, p, size) for p in paths for oid, size in [hash_file(p)]]
    with Session() as s, pytest.raises(RemoteError, match="lost during transfer"):
        pm.hook.stash_many(remote=sftp_remote, items=items, session=s)
    assert died.is_set()
    for obj in objects_in(sftp_store):
        verify_file(obj, "b3:" + obj.name)
    for part in (sftp_store / "tmp").iterdir():
        assert part.name.endswith(".part"), part


def test_a_pool_of_one_connection_uses_no_helper(pm, sshd, sftp_store, tmp_path, small_ranges, monkeypatch):
    """``connections = 1``: one connection for everything (no ranges, no spread)."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", connections=1)
    src = tmp_path / "big.bin"
    make_file(src, (2 << 20) + 1, seed=7)
    oid, size = hash_file(src)
    threads = []
    orig = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start",
                        lambda self: (threads.append(self.name), orig(self))[1])
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    assert HELPER not in threads
    verify_file(sftp_store / "objects" / object_relpath(oid), oid)


def test_full_disk_mid_range_is_that_objects_failure(pm, sshd, small_disk, tmp_path, small_ranges):
    """A 2 MiB disk on the server: the big object written in ranges does not fit, the small one
    does. The big one is that object's failure (not the remote's), its part is removed, nothing
    partial is under its name. Mutation-checked against the SFTP_FAILURE case in put_ranges
    (raising it aborts the batch)."""
    remote = sftp_remote_for(f"sftp://{sshd.alias}{small_disk}")
    a, b = tmp_path / "a", tmp_path / "b"
    make_file(a, 200_000, seed=1)
    make_file(b, 3 << 20, seed=2)
    items = [(oid, p, size) for p in (a, b) for oid, size in [hash_file(p)]]
    with Session() as s:
        out = dict(pm.hook.stash_many(remote=remote, items=items, session=s))
    (oid_a, _, _), (oid_b, _, _) = items
    assert out[oid_a] is None
    err = out[oid_b]
    assert isinstance(err, JamError) and not isinstance(err, RemoteError), err
    assert "no space" in str(err) and "\n" not in str(err)
    verify_file(small_disk / "objects" / object_relpath(oid_a), oid_a)
    assert not (small_disk / "objects" / object_relpath(oid_b)).exists()
    assert list((small_disk / "tmp").iterdir()) == []

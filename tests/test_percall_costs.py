"""Issue 13 follow-up (per-file costs): checkout's catalog rows in one statement per batch, the
hook's fetch without a worker thread for a single batch, records built by slot, doctor's quick
rule for what may be a copy of a stub. Real files, real xattrs."""

from __future__ import annotations

import os

import pytest

from jam_core.catalog import Catalog
from jam_core.root import CATALOG
from tests.conftest import make_file

SIZE = 100_000


def _stash(jam_root, n: int = 3) -> list[str]:
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.stash import stash

    rels = [f"d/f{i}.bin" for i in range(n)]
    for i, rel in enumerate(rels):
        make_file(jam_root.path / rel, SIZE, i)
    res = stash(jam_root, ["d"], make_plugin_manager(), Session())
    assert len(res.done) == n and not res.failed, res
    return rels


def _stub_rows(root) -> set[str]:
    with Catalog(root.jam_dir / CATALOG) as cat:
        return set(cat.stubs())


# -- 1. checkout: the catalog rows of a batch in one statement ------------------------------------
def test_remove_stubs_drops_exactly_the_named_rows(jam_root):
    rels = _stash(jam_root)
    with Catalog(jam_root.jam_dir / CATALOG) as cat:
        cat.remove_stubs([rels[0], rels[2], "no/such/row"])
    assert _stub_rows(jam_root) == {rels[1]}


def test_checkout_drops_the_rows_of_what_it_swapped_in(jam_root):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.checkout import checkout

    rels = _stash(jam_root)
    res = checkout(jam_root, [rels[1]], make_plugin_manager(), Session())
    assert [r for r, _ in res.done] == [rels[1]]
    assert _stub_rows(jam_root) == {rels[0], rels[2]}


def test_an_interrupted_batch_still_drops_the_rows_of_the_files_already_swapped(jam_root, monkeypatch):
    """Ctrl-C after the first swap of a batch: that file is local now, and its stub row must not
    stay behind in the catalog (the rows go once per batch, after the swaps)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops import checkout as co
    from jam_core.stub import read_record

    rels = _stash(jam_root)
    real, calls = co.swap_in, []

    def swap_then_interrupt(w):
        calls.append(w.entry.rel)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(w)

    monkeypatch.setattr(co, "swap_in", swap_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        co.checkout(jam_root, ["d"], make_plugin_manager(), Session())
    first = calls[0]
    assert read_record(str(jam_root.path / first)) is None  # swapped in: a local file now
    assert first not in _stub_rows(jam_root)
    assert _stub_rows(jam_root) == set(rels) - {first}


# -- 2. one batch is moved in the calling thread, with the pool's guarantees -----------------------
def _one_batch(move, prepare=lambda b: b, stop=lambda: False):
    import threading

    from jam_core.model import Session
    from jam_core.ops import pipeline

    log, threads = [], []
    session = Session()
    session.on_close(lambda: log.append("closed"))

    def moving(p):
        threads.append(threading.current_thread())
        return move(p)

    def finish(p, future):
        log.append(("finish", p, future.result()))

    try:
        pipeline.run([7], prepare=prepare, move=moving, finish=finish, stop=stop, session=session,
                     cleanup=lambda p: log.append(("cleanup", p)))
    finally:
        log.append(threads)
    return log


def test_a_single_batch_is_moved_here_and_finished_and_cleaned():
    import threading

    log = _one_batch(lambda b: b * 10)
    assert log == [("finish", 7, 70), ("cleanup", 7), [threading.current_thread()]]


def test_a_single_batch_whose_move_fails_reaches_finish_as_a_failed_future():
    from jam_core.errors import RemoteError

    seen = []

    def move(b):
        raise RemoteError("remote gone")

    from jam_core.model import Session
    from jam_core.ops import pipeline

    def finish(p, future):
        seen.append(type(future.exception()).__name__)
        try:
            future.result()
        except RemoteError as exc:
            seen.append(str(exc))

    pipeline.run([1], prepare=lambda b: b, move=move, finish=finish, stop=lambda: False, session=Session(),
                 cleanup=lambda p: seen.append(("cleanup", p)))
    assert seen == ["RemoteError", "remote gone", ("cleanup", 1)]


def test_an_interruption_in_the_single_batch_cleans_it_and_closes_the_session():
    from jam_core.model import Session
    from jam_core.ops import pipeline

    log = []
    session = Session()
    session.on_close(lambda: log.append("closed"))

    def move(b):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run([3], prepare=lambda b: b, move=move, finish=lambda p, f: log.append("finish"),
                     stop=lambda: False, session=session, cleanup=lambda p: log.append(("cleanup", p)))
    assert log == ["closed", ("cleanup", 3)]


def test_a_single_batch_stopped_while_it_was_prepared_is_not_moved():
    stopped, moved = [], []

    def prepare(b):
        stopped.append(True)  # e.g. the hashing found the run must end
        return b

    log = _one_batch(lambda b: moved.append(b), prepare=prepare, stop=lambda: bool(stopped))
    assert moved == [] and log[:-1] == [("cleanup", 7)]


# -- 3. records built by slot; the dry-run does not load the stash machinery ----------------------
def test_records_are_built_by_slot_and_stay_frozen_dataclasses():
    import dataclasses
    import pickle

    from jam_core.model import FileRecord, Nomination
    from jam_core.policy.records import _record

    assert _record is FileRecord  # one way to build them, not two
    for cls in (FileRecord, Nomination):  # no object.__setattr__ per field
        assert "__setattr__" not in cls.__init__.__code__.co_names
    r = FileRecord("a/b", 12, 1.5, 2.5, 3.5)
    assert (r.path, r.size, r.mtime, r.atime, r.last_used, r.state, r.pinned, r.nlink) == \
        ("a/b", 12, 1.5, 2.5, 3.5, "local", False, 1)
    same = FileRecord(path="a/b", size=12, mtime=1.5, atime=2.5, last_used=3.5, state="local", pinned=False, nlink=1)
    assert r == same and hash(r) == hash(same) and r != FileRecord("a/b", 13, 1.5, 2.5, 3.5)
    assert r != ("a/b", 12, 1.5, 2.5, 3.5, "local", False, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.size = 1
    with pytest.raises(TypeError):
        FileRecord("a/b", 12)
    with pytest.raises(TypeError):
        FileRecord("a/b", 12, 1.5, 2.5, 3.5, bogus=1)
    assert dataclasses.replace(r, size=5).size == 5 and pickle.loads(pickle.dumps(r)) == r
    assert [f.name for f in dataclasses.fields(FileRecord)] == list(FileRecord.__slots__)
    n = Nomination("a/b", "age", "old")
    assert n == Nomination(path="a/b", policy="age", reason="old") and hash(n) == hash(Nomination("a/b", "age", "old"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.reason = "x"


def test_set_by_slot_leaves_a_class_it_cannot_build_alone():
    import dataclasses

    from jam_core.model import _set_by_slot

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list = dataclasses.field(default_factory=list)

    before = WithFactory.__init__
    assert _set_by_slot(WithFactory) is WithFactory and WithFactory.__init__ is before
    assert WithFactory().items == [] and WithFactory().items is not WithFactory().items


def test_a_dry_run_does_not_load_the_stash_machinery(jam_root, tmp_path):
    """`jam stash --auto --dry-run` only plans: it prints the plan without importing ops.stash."""
    import subprocess
    import sys

    make_file(jam_root.path / "old.bin", 100_000, 1)
    os.utime(jam_root.path / "old.bin", (1, 1))
    with jam_root.lock():
        jam_root.update_config(lambda t: t.setdefault("policy", {}).update({"age": {"older_than": "1d"}}))
    # Checked at the very end, whichever way the process ends (a finished dry-run leaves by
    # os._exit, without atexit: cli.finished).
    code = ("import sys, os, atexit\n"
            "def check(): print('LOADED' if 'jam_core.ops.stash' in sys.modules else 'CLEAN', flush=True)\n"
            "atexit.register(check)\n"
            "_exit = os._exit\n"
            "os._exit = lambda c: (atexit.unregister(check), check(), _exit(c))\n"
            "sys.argv = ['jam', 'stash', '--auto', '--dry-run']\n"
            "from jam_core.cli import main\nmain()\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=jam_root.path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "old.bin" in res.stdout, res.stdout
    assert res.stdout.rstrip().endswith("CLEAN"), res.stdout


# -- 4. doctor opens only a file that may be a copy of a stub (scan.may_be_copy) -------------------
def _doctor(root):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor

    return doctor(root, ".", make_plugin_manager(), Session())


def test_doctor_opens_only_files_that_may_be_a_stubs_copy(jam_root, monkeypatch):
    from jam_core import scan

    p = jam_root.path
    make_file(p / "plain.bin", 50_000, 1)  # writable, written out in full: never opened
    make_file(p / "ro.bin", 50_000, 2)
    os.chmod(p / "ro.bin", 0o444)  # read-only: may be a cp of a stub
    with open(p / "sparse.bin", "wb") as f:  # sparse: may be a cp of a stub
        f.write(b"x" * 100)
        f.truncate(1 << 20)
    (p / "tiny.txt").write_bytes(b"# jam stub v1\nshort")
    os.chmod(p / "tiny.txt", 0o444)  # shorter than any header: cannot be a stub's copy
    opened = []
    real = scan.record_from_copy
    monkeypatch.setattr(scan, "record_from_copy", lambda path, st: (opened.append(st.st_size), real(path, st))[1])
    res = _doctor(jam_root)
    assert sorted(opened) == [50_000, 1 << 20]
    assert res.exit_code == 0, res.problems


def test_doctor_still_finds_a_non_sparse_read_only_copy_of_a_stub(jam_root):
    """``shutil.copyfile`` (or rsync without -S) writes a stub out in full, holes and all, and
    drops its xattrs; with the stub's read-only mode kept, it is still a stub that lost its xattrs."""
    import shutil

    rels = _stash(jam_root, 1)
    src, copy = jam_root.path / rels[0], jam_root.path / "copy.bin"
    shutil.copyfile(src, copy)
    os.chmod(copy, 0o444)
    st = os.lstat(copy)
    assert st.st_blocks * 512 >= st.st_size and "user.jam" not in os.listxattr(copy)
    res = _doctor(jam_root)
    assert [(p.kind, p.path) for p in res.problems] == [("lost-xattr", "copy.bin")]


def test_the_shortest_header_is_the_shortest_a_stub_can_have():
    from jam_core.scan import SHORTEST_HEADER
    from jam_core.stub import StubRecord

    for oid in ("b3:" + "f" * 64, "sha256:" + "0" * 64):
        for size, mode, mtime in ((0, 0, 0), (10**15, 0o7777, -(1 << 62)), (1, 0o644, 1)):
            assert len(StubRecord(oid, size, mode, mtime).header("")) >= SHORTEST_HEADER

"""Scans at the speed of `find` (issue 13), what must still hold: doctor reads the xattr of an
ordinary file only where it could be a stub's inode, and still finds a stub overwritten in full,
renamed, or a catalog that cannot say; jam's leftovers are still found when the walk no longer
shows doctor every directory; a large root walked by two processes (``scan.scan_shared``) finds
exactly what one walk finds, also when the helper dies; the dry-run's lazy records are the
FileRecords a policy always saw. Real stubs, real xattrs, a real dir remote; the reads are counted
by wrapping the functions that make them, the helper is forced with a threshold of 0."""

from __future__ import annotations

import os
import select
import shutil
import sqlite3
import time

import pytest

import jam_core.scan as scan_mod
from jam_core.root import CATALOG
from tests.conftest import make_file

SIZE = 100_000
DAY = 86400


def _stash(runner, *paths):
    from jam_core.cli import main

    res = runner.invoke(main, ["stash", *paths])
    assert res.exit_code == 0, res.output + res.stderr


def _doctor(root, **kw):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor

    with Session() as s:
        return doctor(root, ".", make_plugin_manager(), s, **kw)


def _problems(res) -> set[tuple[str, str]]:
    return {(p.kind, p.path) for p in res.problems}


def _forget_inodes(root) -> None:
    con = sqlite3.connect(root.jam_dir / CATALOG)
    with con:
        con.execute("UPDATE stubs SET ino = NULL, ctime_ns = NULL")
    con.close()


def _overwrite_in_full(path, seed: int) -> None:
    """Make a stub writable and write new bytes over all of it, in place (same inode)."""
    os.chmod(path, 0o644)
    data = make_file_bytes(os.lstat(path).st_size, seed)
    with open(path, "r+b") as f:
        f.write(data)


def make_file_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@pytest.fixture
def xattr_reads(monkeypatch):
    """Every xattr read of the scan, by file name."""
    seen: list[str] = []
    real = scan_mod.getxattr

    def counting(path, *a, **kw):
        seen.append(os.path.basename(os.fsdecode(path)))
        return real(path, *a, **kw)
    monkeypatch.setattr(scan_mod, "getxattr", counting)
    return seen


# -- doctor: whose xattr is read ------------------------------------------------------------------

def test_doctor_finds_a_stub_overwritten_in_full_then_renamed(jam_root, runner):
    """Its inode is the one the catalog recorded for a stub: read, found dirty, under its new name."""
    make_file(jam_root.path / "d" / "a.bin", SIZE, 1)
    _stash(runner, "d")
    _overwrite_in_full(jam_root.path / "d" / "a.bin", 2)
    os.rename(jam_root.path / "d" / "a.bin", jam_root.path / "d" / "b.bin")
    res = _doctor(jam_root)
    assert ("dirty", "d/b.bin") in _problems(res), _problems(res)


def test_doctor_reads_no_xattr_of_an_ordinary_file(jam_root, runner, xattr_reads):
    make_file(jam_root.path / "d" / "s.bin", SIZE, 1)
    _stash(runner, "d")
    for i in range(5):
        make_file(jam_root.path / "d" / f"local{i}.bin", SIZE, 10 + i)
    res = _doctor(jam_root)
    assert res.exit_code == 0 and res.stubs == 1
    assert not [n for n in xattr_reads if n.startswith("local")], xattr_reads


def test_doctor_reads_every_xattr_when_the_catalog_cannot_say(jam_root, runner):
    """A copy of a stub with its xattrs (a new inode), made writable and overwritten in full: with
    a catalog row that has no inode, or with --deep, every file's xattr is read and it is dirty."""
    make_file(jam_root.path / "d" / "a.bin", SIZE, 1)
    _stash(runner, "d")
    copy = jam_root.path / "d" / "copy.bin"
    shutil.copy2(jam_root.path / "d" / "a.bin", copy)  # keeps user.jam
    _overwrite_in_full(copy, 3)
    assert ("dirty", "d/copy.bin") in _problems(_doctor(jam_root, deep=True))
    _forget_inodes(jam_root)
    assert ("dirty", "d/copy.bin") in _problems(_doctor(jam_root))


def test_doctor_still_finds_leftovers_in_any_directory(jam_root, runner):
    """The walk shows doctor's tidy only directories with a jam temporary name: those are found."""
    from jam_core.fs import TMP_MARK

    make_file(jam_root.path / "d" / "a.bin", SIZE, 1)
    _stash(runner, "d")
    ours = jam_root.path / "d" / "e" / ".jam-0123456789abcdef.tmp"
    make_file(ours, 1000, 5)
    os.setxattr(ours, TMP_MARK, b"1")
    foreign = jam_root.path / "d" / ".jam-fedcba9876543210.tmp"
    make_file(foreign, 1000, 6)
    res = _doctor(jam_root)
    found = {(c.kind, c.path) for c in res.findings}
    assert ("leftover", "d/e/.jam-0123456789abcdef.tmp") in found, found
    assert ("foreign-tmp", "d/.jam-fedcba9876543210.tmp") in found, found


# -- one walk shared by two processes ------------------------------------------------------------

def _tree(jam_root, runner, dirs: int = 6, under: str = "") -> None:
    """Directories of local files and a stub each; one stub written into, one copy that lost its
    xattrs (the problems status must report, wherever the walk finds them). ``under``: all of
    it in that directory ("a/b/") but ``top.txt``."""
    jam_root.update_config(lambda c: c.setdefault("core", {}).__setitem__("min_size", "1"))
    old = time.time() - 40 * DAY
    for k in range(dirs):
        for i in range(4):
            p = jam_root.path / f"{under}d{k}" / f"f{i}.txt"
            make_file(p, 2000 + i, k * 10 + i)
            if i % 2:
                os.utime(p, (old, old))
        make_file(jam_root.path / f"{under}d{k}" / "s.bin", SIZE, 100 + k)
    make_file(jam_root.path / "top.txt", 3000, 99)
    _stash(runner, *[f"{under}d{k}/s.bin" for k in range(dirs)])
    dirty = jam_root.path / f"{under}d{dirs - 1}" / "s.bin"
    st = os.lstat(dirty)
    os.chmod(dirty, 0o644)
    with open(dirty, "r+b") as f:
        f.seek(100)
        f.write(b"EDITED")
    os.utime(dirty, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(dirty, st.st_mode & 0o7777)
    lost = jam_root.path / f"{under}d{dirs - 2}" / "lost.bin"
    shutil.copyfile(jam_root.path / f"{under}d{dirs - 2}" / "s.bin", lost)  # no xattrs
    os.chmod(lost, 0o444)


@pytest.fixture
def shared(monkeypatch, tmp_path):
    """Force the helper (threshold 0, one thread) and record which processes walked. The
    processes meet through a pipe: the parent waits, as it starts its first directory, until
    the helper has started one (so the helper surely takes a share); with ``die`` the helper is
    killed right there, as it starts its first directory."""
    log = tmp_path / "walkers"
    real = scan_mod._scan_from
    parent = os.getpid()
    state = {"on": False, "die": False, "waited": False}
    r, w = os.pipe()

    def recording(root_fd, rel, *a, **kw):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        if state["on"] and rel != "." and kw.get("depth") != 0:  # (depth 0: a lone directory opened up, unshared)
            if os.getpid() != parent:
                os.write(w, b"x")
                if state["die"]:
                    os._exit(3)
            elif not state["waited"]:
                state["waited"] = True
                if select.select([r], [], [], 60)[0]:  # (a guard: no helper ever coming fails the test, not hangs it)
                    os.read(r, 1)
        yield from real(root_fd, rel, *a, **kw)
    monkeypatch.setattr(scan_mod, "_scan_from", recording)
    monkeypatch.setattr(scan_mod, "_threads", lambda: 1)

    def walkers() -> set[str]:
        return set(log.read_text().split()) if log.exists() else set()

    def share(on: bool, die: bool = False) -> None:
        monkeypatch.setattr(scan_mod, "SHARE_AFTER", 0 if on else 10**12)
        state.update(on=on, die=die, waited=False)
        log.unlink(missing_ok=True)
    share.walkers = walkers
    yield share
    os.close(r)
    os.close(w)


def _status_view(res):
    return (res.total, sorted(res.directories.items()), sorted(res.problems))


def _alone_then_shared(jam_root, shared):
    """Status walked by one process, then by two (every stub read both times: stamps to record,
    from both processes); the second finds exactly what the first found. Returns the second."""
    from jam_core.ops.status import status

    _forget_inodes(jam_root)
    shared(False)
    alone = _status_view(status(jam_root))
    _forget_inodes(jam_root)
    shared(True)
    both = status(jam_root)
    assert len(shared.walkers()) == 2, "a helper walked part of the root"
    assert _status_view(both) == alone
    return both


def test_a_shared_status_finds_what_one_walk_finds(jam_root, runner, shared):

    _tree(jam_root, runner)
    both = _alone_then_shared(jam_root, shared)
    assert ("d5/s.bin", "stub written into after stashing") in both.problems
    assert any(p == "d4/lost.bin" for p, _ in both.problems)
    from jam_core.catalog import Catalog

    with Catalog(jam_root.jam_dir / CATALOG) as cat:  # the helper's clean stubs got their stamps too
        got = cat.stub_stamps()
    assert {k for k, v in got.items() if v[2] is not None} == {f"d{k}/s.bin".encode() for k in range(5)}


def test_a_root_whose_content_sits_under_one_directory_is_still_shared(jam_root, runner, shared):
    """Everything under ``home/me/`` (one directory at the top, one below it): the lone
    directories are opened up and their subdirectories shared; the helper walks part of them
    and status finds exactly what one walk finds, problems included."""
    _tree(jam_root, runner, under="home/me/")
    (jam_root.path / "home" / "me" / "notes.txt").write_text("the lone directory's own file")
    both = _alone_then_shared(jam_root, shared)
    assert both.directories["home/me"].files == 1
    assert ("home/me/d5/s.bin", "stub written into after stashing") in both.problems


def test_a_helper_that_dies_has_its_share_walked_again(jam_root, runner, shared):
    from jam_core.ops.status import status

    _tree(jam_root, runner)
    shared(False)
    alone = _status_view(status(jam_root))
    shared(True, die=True)
    assert _status_view(status(jam_root)) == alone
    assert len(shared.walkers()) == 2, "the helper started a directory before it died"


def test_a_shared_dry_run_plans_what_one_walk_plans(jam_root, runner, shared):
    from jam_core.manager import make_plugin_manager
    from jam_core.policy.plan import plan_auto

    _tree(jam_root, runner)
    jam_root.update_config(lambda c: c.setdefault("policy", {}).__setitem__("age", {"older_than": "30d"}))
    shared(False)
    alone = plan_auto(jam_root, make_plugin_manager()).to_json()
    shared(True)
    both = plan_auto(jam_root, make_plugin_manager()).to_json()
    assert len(shared.walkers()) == 2
    assert both == alone
    assert sorted(f["path"] for f in both["files"]) == sorted(f"d{k}/f{i}.txt" for k in range(6) for i in (1, 3))


def test_lazy_records_are_the_file_records_a_policy_always_saw(jam_root, runner):
    """A third-party policy iterating the records gets FileRecords sorted by path, equal to those
    built one by one; jam_age choosing on the lists nominates the same files as on records."""
    import jam_age
    from jam_core.model import FileRecord
    from jam_core.policy.records import Records, inventory

    _tree(jam_root, runner, dirs=3)
    inv = inventory(jam_root)
    lazy = Records(candidates=inv.candidates)
    built = tuple(sorted((inv.candidates[p] for p in inv.candidates), key=lambda r: r.path))
    assert len(lazy) == len(built) == 13 and all(type(r) is FileRecord for r in lazy)
    assert tuple(lazy) == built and lazy[0] == built[0] and lazy == built
    now = time.time()
    on_lists = jam_age.select_older(Records(candidates=inv.candidates), 30 * DAY, now)
    on_records = jam_age.select_older(list(built), 30 * DAY, now)
    assert sorted((n.path, n.reason) for n in on_lists) == sorted((n.path, n.reason) for n in on_records)
    assert len(on_lists) == 6


def test_a_top_directory_swapped_for_a_file_mid_walk_changes_nothing_else(jam_root, runner, shared, monkeypatch):
    """Once the root's directories are listed for sharing, one is replaced by a file and one
    removed: the walk passes over them quietly, as one walk would, and the root's own files
    still count."""
    from jam_core.ops.status import status

    _tree(jam_root, runner, dirs=3)
    shared(True)
    real = scan_mod._top_dirs

    def listed_then_swapped(root_fd, skip):
        units = real(root_fd, skip)
        shutil.rmtree(jam_root.path / "d0")
        make_file(jam_root.path / "d0", 500, 7)  # a file where the directory was
        shutil.rmtree(jam_root.path / "d1")  # and one gone
        return units
    monkeypatch.setattr(scan_mod, "_top_dirs", listed_then_swapped)
    res = status(jam_root)
    assert res.directories["."].files == 1 and res.directories["."].bytes == 3000  # top.txt
    assert not [p for p, _ in res.problems if p.startswith(("d0", "d1"))], res.problems
    assert sorted(res.directories) == [".", "d2"]


@pytest.fixture
def reads_log(monkeypatch, tmp_path):
    """The files whose xattr the scan reads, from any process (a file appended to): ``reads(root)``
    lists them relative to ``root``, ``reads.reset()`` forgets them."""
    log = tmp_path / "reads"
    real = scan_mod.getxattr

    def logged(path, *a, **kw):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, os.fsencode(os.path.realpath(path)) + b"\n")
        finally:
            os.close(fd)
        return real(path, *a, **kw)
    monkeypatch.setattr(scan_mod, "getxattr", logged)

    def reads(root) -> list[str]:
        seen = log.read_bytes().decode(errors="surrogateescape").split("\n") if log.exists() else []
        return [os.path.relpath(p, root.path) for p in seen if p]

    reads.reset = lambda: log.unlink(missing_ok=True)
    return reads


@pytest.mark.parametrize("under", ["", "home/me/"])
def test_a_shared_status_trusts_the_stamps_in_both_processes(jam_root, runner, shared, reads_log, under):
    """Each process loads the catalog's stamps of the directories it walks: with two, no
    untouched stub is read by either (only the one written into and the copy with no xattrs
    are), and the tallies are those of one walk. With everything under one directory, the
    directories opened up are loaded for their own files alone, their subdirectories whole."""
    from jam_core.ops.status import status

    _tree(jam_root, runner, under=under)
    make_file(jam_root.path / "top.bin", SIZE, 98)
    _stash(runner, "top.bin")
    shared(False)
    reads_log.reset()
    alone = _status_view(status(jam_root))
    assert sorted(reads_log(jam_root)) == [f"{under}d4/lost.bin", f"{under}d5/s.bin"]
    shared(True)
    reads_log.reset()
    both = status(jam_root)
    assert len(shared.walkers()) == 2, "a helper walked part of the root"
    assert _status_view(both) == alone
    assert both.total.stubs == 7 and both.total.dirty == 1  # (the copy with no xattrs is a stub too)
    assert sorted(reads_log(jam_root)) == [f"{under}d4/lost.bin", f"{under}d5/s.bin"]


def test_stubs_moved_into_both_shares_are_found_by_their_inodes(jam_root, runner, shared, reads_log):
    """Stubs moved (`mv`) from the root's top into every directory keep their rows at the old
    paths: whichever process walks them finds the row by inode, reads the stub once, and the new
    stamp lands on that row; the next status (shared again) trusts them unread. Both count what
    one walk counts."""
    from jam_core.ops.status import status

    _tree(jam_root, runner)
    for k in range(6):
        make_file(jam_root.path / f"m{k}.bin", SIZE, 70 + k)
    _stash(runner, *[f"m{k}.bin" for k in range(6)])
    for k in range(6):
        os.rename(jam_root.path / f"m{k}.bin", jam_root.path / f"d{k}" / f"m{k}.bin")
    shared(True)
    reads_log.reset()
    first = status(jam_root)
    assert len(shared.walkers()) == 2
    assert {f"d{k}/m{k}.bin" for k in range(6)} <= set(reads_log(jam_root))
    assert first.total.stubs == 12 and not [p for p, _ in first.problems if "/m" in p]
    reads_log.reset()
    again = status(jam_root)
    assert _status_view(again) == _status_view(first)
    assert sorted(reads_log(jam_root)) == ["d4/lost.bin", "d5/s.bin"]
    shared(False)
    assert _status_view(status(jam_root)) == _status_view(first)


def test_the_catalog_gives_a_walk_its_stamps_by_directory(jam_root):
    """``stamps_by_dir``: the top's own stubs, a directory's own (``children``) or all below it,
    as the walk names them (a name that is not UTF-8 included), and never a neighbour whose
    name only starts alike (``d1`` is not ``d10``)."""
    from jam_core.catalog import Catalog

    odd = os.fsdecode(b"caf\xe9.bin")
    rows = [(p, "b3:" + "0" * 64, 1, 2, "2024-01-01T00:00:00Z", 3, 4)
            for p in ("top.bin", "d1/a.bin", "d1/x/b.bin", "d10/c.bin", f"d1/{odd}", "d1/x/y/z.bin")]
    with Catalog(jam_root.jam_dir / CATALOG) as cat:
        cat.replace_stubs(rows)
        assert cat.stamps_by_dir(".", children=True) == {".": {"top.bin": (1, 2, 3, 4)}}
        assert cat.stamps_by_dir("d1", children=True) == {"d1": {"a.bin": (1, 2, 3, 4), odd: (1, 2, 3, 4)}}
        whole = cat.stamps_by_dir("d1")
        assert sorted((d, sorted(n)) for d, n in whole.items()) == [
            ("d1", sorted(["a.bin", odd])), ("d1/x", ["b.bin"]), ("d1/x/y", ["z.bin"])]
        assert set(cat.stamps_by_dir()) == {".", "d1", "d1/x", "d1/x/y", "d10"}


@pytest.mark.parametrize("sharing", [False, True])
def test_a_directory_walked_in_parts_is_counted_as_one(jam_root, runner, shared, monkeypatch, sharing):
    """A directory of more files than ``scan.PART`` reaches status and the dry-run in parts (a
    million files in one directory never held as a million lstats): the tallies, problems and
    plan are those of the directory in one part, by one walk or two."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.status import status
    from jam_core.policy.plan import plan_auto

    _tree(jam_root, runner)
    jam_root.update_config(lambda c: c.setdefault("policy", {}).__setitem__("age", {"older_than": "30d"}))
    shared(sharing)
    whole = (_status_view(status(jam_root)), plan_auto(jam_root, make_plugin_manager()).to_json())
    monkeypatch.setattr(scan_mod, "PART", 2)
    shared(sharing)
    parts = (_status_view(status(jam_root)), plan_auto(jam_root, make_plugin_manager()).to_json())
    assert parts == whole
    assert whole[0][0].files == 32 and whole[0][0].local == 25


def test_no_catalog_connection_crosses_the_helpers_fork(jam_root, runner, shared, monkeypatch):
    """SQLite forbids carrying an open connection across fork(): status closes the one it read
    the top's stamps with before the helper is forked (``Share.before_fork``), and each process
    opens its own for the directories it walks."""
    import jam_core.ops.status as status_mod

    made, open_at_fork = [], []
    real_init, real_fork = status_mod._Stamps.__init__, os.fork

    def init(self, db):
        real_init(self, db)
        made.append(self)

    def fork():
        open_at_fork.append([s.cat is not None for s in made])
        return real_fork()
    monkeypatch.setattr(status_mod._Stamps, "__init__", init)
    monkeypatch.setattr(os, "fork", fork)
    _tree(jam_root, runner)
    shared(True)
    res = status_mod.status(jam_root)
    assert len(shared.walkers()) == 2 and res.total.stubs == 6
    assert open_at_fork == [[False]], open_at_fork

"""fs.DirFds under a descriptor budget, and the descriptor walks without recursion
(fs.walk_dirs, fs.remove_tree): what a stash, a checkout and doctor rely on in a tree with more
directories than a process may hold open, or nested deeper than Python's stack."""

from __future__ import annotations

import os

import pytest

from jam_core import fs
from jam_core.fs import DirFds, ThroughSymlink, remove_tree, walk_dirs


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tree(base, n):
    for i in range(n):
        (base / f"d{i}" / "sub").mkdir(parents=True)
        (base / f"d{i}" / "sub" / "f").write_text(str(i))


def test_idle_directories_beyond_the_budget_are_closed_least_recently_used_first(tmp_path):
    _tree(tmp_path, 40)
    before = _open_fds()
    with DirFds(tmp_path, limit=8) as dirs:
        for i in range(40):
            fd = dirs.get(f"d{i}/sub")
            assert os.stat("f", dir_fd=fd).st_size == len(str(i))
            assert _open_fds() - before <= 8 + 1  # the budget, and the root's own descriptor
        dirs.get("d39")  # recently used: kept; d0's went long ago and opens again
        assert os.listdir(dirs.get("d0/sub")) == ["f"]
    assert _open_fds() == before


def test_a_held_directory_is_never_closed_by_the_budget_and_goes_when_released(tmp_path):
    _tree(tmp_path, 30)
    with DirFds(tmp_path, limit=4) as dirs:
        held = {i: dirs.hold(f"d{i}/sub") for i in range(10)}  # more than the budget: all stay
        for i in range(10, 30):
            dirs.get(f"d{i}/sub")
        for i, fd in held.items():  # each still the directory it was (not a reused number)
            assert os.fstat(fd).st_ino == os.stat(tmp_path / f"d{i}" / "sub").st_ino, i
        assert len(dirs._fds) >= 10
        for i in range(10):
            dirs.release(f"d{i}/sub")
        dirs.get("d29/sub")
        assert len(dirs._fds) <= 4


def test_holds_are_counted(tmp_path):
    _tree(tmp_path, 6)
    with DirFds(tmp_path, limit=1) as dirs:
        fd = dirs.hold("d0/sub")
        dirs.hold("d0/sub")
        dirs.release("d0/sub")
        for i in range(1, 6):
            dirs.get(f"d{i}/sub")
        want = os.stat(tmp_path / "d0" / "sub").st_ino
        assert os.fstat(fd).st_ino == want  # one hold left: still open, still d0/sub
        dirs.release("d0/sub")
        dirs.get("d5/sub")
        assert "d0/sub" not in dirs._fds


def test_a_symlink_on_the_way_is_refused_at_any_depth(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "out", tmp_path / "a" / "b" / "c")
    with DirFds(tmp_path, limit=2) as dirs:
        dirs.get("a")
        with pytest.raises(ThroughSymlink):
            dirs.get("a/b/c/d")


def _deep(base, depth):
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def _unnest(base):
    """Remove a chain made by _deep one level at a time (pytest's clean-up recurses)."""
    cur, i = base / "d", 0
    while cur.is_dir():
        nxt = None
        if (cur / "d").is_dir():
            nxt = base / f".up{i}"
            os.rename(cur / "d", nxt)
        for p in cur.iterdir():
            p.unlink()
        cur.rmdir()
        cur, i = (nxt, i + 1) if nxt else (base / "none", i)


def test_deeper_than_the_recursion_limit(tmp_path):
    _deep(tmp_path, 1300)
    rel = "/".join(["d"] * 1300)
    top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with DirFds(tmp_path, limit=16) as dirs:
            assert os.listdir(dirs.get(rel)) == ["f"]
        assert sum(1 for _ in walk_dirs(top)) == 1301
        remove_tree("d", top)
        assert os.listdir(tmp_path) == []
    finally:
        os.close(top)
        _unnest(tmp_path)


def test_remove_tree_removes_a_symlink_inside_and_never_what_it_points_to(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    (tmp_path / "t" / "u").mkdir(parents=True)
    (tmp_path / "t" / "u" / "f").write_text("y")
    os.symlink(keep, tmp_path / "t" / "u" / "link")
    os.symlink(keep / "precious", tmp_path / "t" / "flink")
    top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walked = [rel for rel, _ in walk_dirs(top)]
        remove_tree("t", top)
    finally:
        os.close(top)
    assert sorted(walked) == ["", "keep", "t", "t/u"]  # the symlinked directory not entered
    assert not (tmp_path / "t").exists() and (keep / "precious").read_text() == "x"


def test_the_budget_follows_the_descriptor_limit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 256))
    assert fs.fd_budget() == (256 - 64) // 6
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64, 64))
    assert fs.fd_budget() == (64 - 32) // 6


def _limited(n: int):
    def pre():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # `ulimit -n N` in the user's shell

    return pre


@pytest.mark.parametrize("limit", [64, 128])
def test_a_stash_and_checkout_under_a_tiny_descriptor_limit_do_every_file(tmp_path, limit):
    """`ulimit -n 64` (soft and hard): the batches shrink to what fits, every file is stashed
    and checked out, nothing fails with EMFILE."""
    import random
    import subprocess

    from tests.safety_support import JAM, b3, is_stub, make_tree

    t = make_tree(tmp_path)
    files = [t.root / "w" / f"d{i:02}" / f"f{j}" for i in range(40) for j in range(2)]
    for k, f in enumerate(files):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(random.Random(k).randbytes(70_000))
    want = [b3(f) for f in files]
    for cmd, stubs in (("stash", len(files)), ("checkout", 0)):
        res = subprocess.run([JAM, cmd, "w"], cwd=t.root, capture_output=True, text=True, preexec_fn=_limited(limit))
        assert (res.returncode, sum(map(is_stub, files))) == (0, stubs), res.stderr[-600:]
    assert [b3(f) for f in files] == want

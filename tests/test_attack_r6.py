"""R6's attacks on versions / a second computer (restore, sync, clone, commit/log/diff) and the
daemon. Two roots on one machine stand in for two computers (each jam process its own
JAM_MACHINE_ID) sharing a dir remote. Real files, real xattrs, the real `jam` command; races
injected at their exact instant (a monkeypatched function), never by sleeping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.safety_support import b3, is_stub, make_tree, run_jam


def run(root, *args, machine: str, check: int | None = 0):
    return run_jam(root, *args, machine=machine, check=check)


def two(tmp_path):
    """Root A (machine "aaa") with a committed tree; root B cloned from A's remote ("bbb")."""
    t = make_tree(tmp_path, "a")
    a = t.root
    (a / "docs").mkdir()
    (a / "docs/one.txt").write_bytes(b"one\n" * 1000)
    (a / "docs/two.txt").write_bytes(b"two\n" * 1000)
    run(a, "commit", "-m", "first", machine="aaa")
    b = tmp_path / "b"
    run(tmp_path, "clone", str(t.remote), str(b), machine="bbb")
    return t, a, b


def write_into_stub_keeping_its_stat(path: Path, data: bytes) -> None:
    """What `rsync --inplace -t` or an editor with `touch -r` does to a stub: bytes written into
    its first block, its mode and mtime put back (size and block count unchanged)."""
    st = os.stat(path)
    os.chmod(path, 0o644)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    os.chmod(path, st.st_mode & 0o7777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns, now.st_blocks) == (st.st_size, st.st_mtime_ns, st.st_blocks)


# -- 1. sync over a stub written into (its stat put back) ------------------------------------------
@pytest.mark.parametrize("there", ["deleted", "modified"])
def test_sync_never_removes_or_replaces_a_stub_written_into_with_its_stat_put_back(tmp_path, there):
    """Invariant 5 for sync: B's stub of docs/one.txt is written into (the user's bytes, mtime
    and mode put back: the stat rule cannot see it); A deletes or modifies that file and syncs.
    B's sync must keep what B's user wrote."""
    t, a, b = two(tmp_path)
    mine = b"B's user wrote this into the stub\n"
    write_into_stub_keeping_its_stat(b / "docs/one.txt", mine)
    if there == "deleted":
        (a / "docs/one.txt").unlink()
    else:
        (a / "docs/one.txt").write_bytes(b"one, newer on a\n")
    run(a, "sync", machine="aaa")
    run(b, "sync", machine="bbb", check=None)
    p = b / "docs/one.txt"
    assert p.exists() and p.read_bytes().startswith(mine), "B's written bytes were lost"


# -- 4. hostile input to log / diff / restore -------------------------------------------------------
@pytest.mark.parametrize("when", ["2026-13-45", "2099-02-30", "2099-01-01 25:61"])
def test_a_date_that_does_not_exist_is_refused_not_read_as_another_day(tmp_path, when):
    """`--at 2026-13-45` is a typo, not a date: mktime would roll it over into 2027 (the newest
    snapshot, silently); it is one `jam: ` line, exit 2, nothing restored."""
    t = make_tree(tmp_path, "a")
    (t.root / "f").write_bytes(b"f\n")
    run(t.root, "commit", machine="aaa")
    (t.root / "f").unlink()
    res = run(t.root, "restore", "f", "--at", when, machine="aaa", check=2)
    assert res.err.startswith("jam: ") and len(res.err.splitlines()) == 1, res.err
    assert not (t.root / "f").exists()

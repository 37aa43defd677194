"""Issue 15 part 2: `jam clone` and `jam sync`. Two roots on one machine stand in for two
computers (each jam process gets its own JAM_MACHINE_ID) sharing a dir remote (and one test
through the real sshd's sftp remote). Real files, real xattrs, the real `jam` command; races and
kills injected at the exact instant (a monkeypatched function in a subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from jam_core.history.snapshot import FILE, Item, Snapshot, encode
from tests.safety_support import JAM, b3, is_stub, make_tree, run_jam


def run(root, *args, machine: str, check: int | None = 0, cwd=None):
    return run_jam(cwd or root, *args, machine=machine, check=check)


def two(tmp_path):
    """Root A (machine "aaa") with a committed tree; root B cloned from A's remote ("bbb")."""
    t = make_tree(tmp_path, "a")
    a = t.root
    (a / "docs").mkdir()
    (a / "docs/one.txt").write_bytes(b"one\n")
    (a / "docs/two.txt").write_bytes(b"two\n")
    (a / "big.bin").write_bytes(os.urandom(200_000))
    os.symlink("docs/one.txt", a / "link")
    (a / "empty").write_bytes(b"")
    run(a, "commit", "-m", "first", machine="aaa")
    b = tmp_path / "b"
    run(tmp_path, "clone", str(t.remote), str(b), machine="bbb")
    return t, a, b


def sync(root, machine, check=0):
    return run(root, "sync", machine=machine, check=check)


# -- clone -----------------------------------------------------------------------------------------
def test_clone_makes_the_whole_tree_as_stubs(tmp_path):
    t, a, b = two(tmp_path)
    assert is_stub(b / "docs/one.txt") and is_stub(b / "big.bin")
    assert os.readlink(b / "link") == "docs/one.txt"
    assert (b / "empty").stat().st_size == 0
    assert (b / "big.bin").stat().st_size == 200_000
    assert (b / "big.bin").stat().st_blocks * 512 < 200_000, "a stub uses no space"
    assert "origin" in (b / ".jam/config.toml").read_text()
    head = (b / ".jam/history/HEAD").read_text().strip()
    assert head == (a / ".jam/history/HEAD").read_text().strip()
    run(b, "checkout", "big.bin", "docs", machine="bbb")
    assert b3(b / "big.bin") == b3(a / "big.bin")
    assert (b / "docs/two.txt").read_bytes() == b"two\n"
    # the next commit of B has the clone's snapshot as parent
    (b / "new.txt").write_bytes(b"new\n")
    run(b, "commit", machine="bbb")
    rows = run(b, "log", machine="bbb").out.splitlines()
    assert len(rows) == 2 and head.partition(":")[2][:12] in rows[1]


def test_clone_refuses_a_non_empty_path_and_asks_which_tree(tmp_path):
    t, a, _b = two(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_bytes(b"x")
    res = run(tmp_path, "clone", str(t.remote), str(busy), machine="ccc", check=2)
    assert res.err.startswith("jam: ") and "not empty" in res.err and len(res.err.splitlines()) == 1
    # a second tree on the same remote: clone asks which
    other = tmp_path / "other"
    other.mkdir()
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    root, _ = Root.init(other, default_remote=False)
    add_remote(root, make_plugin_manager(), "vault", str(t.remote))
    (other / "f").write_bytes(b"f")
    run(other, "commit", machine="ccc")
    res = run(tmp_path, "clone", str(t.remote), str(tmp_path / "c"), machine="ccc", check=2)
    assert "--tree" in res.err and "a" in res.err and "other" in res.err and len(res.err.splitlines()) == 1
    assert not (tmp_path / "c").exists() or not os.listdir(tmp_path / "c")
    run(tmp_path, "clone", str(t.remote), str(tmp_path / "c"), "--tree", "other", machine="ccc")
    assert is_stub(tmp_path / "c/f") or (tmp_path / "c/f").exists()


def test_clone_refuses_a_directory_that_is_not_a_remote(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    res = run(tmp_path, "clone", str(empty), str(tmp_path / "c"), machine="ccc", check=2)
    assert res.err.startswith("jam: ") and "identity marker" in res.err


# -- sync ------------------------------------------------------------------------------------------
def test_edits_on_both_sides_arrive_on_both(tmp_path):
    t, a, b = two(tmp_path)
    (a / "docs/a-new.txt").write_bytes(b"from a\n")
    (b / "b-new.txt").write_bytes(b"from b\n")
    run(b, "checkout", "docs/two.txt", machine="bbb")
    (b / "docs/two.txt").write_bytes(b"two, edited on b\n")
    sync(a, "aaa")
    sync(b, "bbb")
    sync(a, "aaa")
    for root in (a, b):
        assert (root / "docs/a-new.txt").exists() and (root / "b-new.txt").exists()
    assert is_stub(a / "b-new.txt") and is_stub(a / "docs/two.txt")
    run(a, "checkout", "b-new.txt", "docs/two.txt", machine="aaa")
    assert (a / "b-new.txt").read_bytes() == b"from b\n"
    assert (a / "docs/two.txt").read_bytes() == b"two, edited on b\n"
    # converged: both heads the same snapshot; another sync changes nothing
    sync(b, "bbb")
    assert (a / ".jam/history/HEAD").read_text() == (b / ".jam/history/HEAD").read_text()
    out = sync(a, "aaa").out
    assert "0 heads merged" in out


def test_a_conflict_keeps_both_versions(tmp_path):
    t, a, b = two(tmp_path)
    (a / "docs/one.txt").write_bytes(b"one, by a\n")
    run(b, "checkout", "docs/one.txt", machine="bbb")
    (b / "docs/one.txt").write_bytes(b"one, by b\n")
    sync(a, "aaa")
    res = sync(b, "bbb", check=1)
    copies = [p for p in (b / "docs").iterdir() if "conflicted copy from" in p.name]
    assert len(copies) == 1 and copies[0].name.startswith("one (conflicted copy from ")
    assert copies[0].name.endswith(").txt")
    assert "conflict" in res.err and copies[0].name in res.err
    assert (b / "docs/one.txt").read_bytes() == b"one, by b\n"
    run(b, "checkout", str(copies[0].relative_to(b)), machine="bbb")
    assert copies[0].read_bytes() == b"one, by a\n"
    sync(a, "aaa")  # A takes the merge: both machines hold both versions under the same names
    run(a, "checkout", "docs", machine="aaa")
    assert (a / "docs/one.txt").read_bytes() == b"one, by b\n"
    assert (a / "docs" / copies[0].name).read_bytes() == b"one, by a\n"
    assert (a / ".jam/history/HEAD").read_text() == (b / ".jam/history/HEAD").read_text()


def test_deleted_here_modified_there_comes_back(tmp_path):
    t, a, b = two(tmp_path)
    (a / "docs/two.txt").unlink()
    run(b, "checkout", "docs/two.txt", machine="bbb")
    (b / "docs/two.txt").write_bytes(b"two, kept alive by b\n")
    sync(b, "bbb")
    sync(a, "aaa")  # deleted here (a), modified there (b): it comes back
    run(a, "checkout", "docs/two.txt", machine="aaa")
    assert (a / "docs/two.txt").read_bytes() == b"two, kept alive by b\n"
    sync(b, "bbb")
    assert (b / "docs/two.txt").read_bytes() == b"two, kept alive by b\n"


def test_deleted_there_unchanged_here_is_removed_but_a_changed_file_stays(tmp_path):
    t, a, b = two(tmp_path)
    (a / "docs/one.txt").unlink()
    (a / "docs/two.txt").unlink()
    sync(a, "aaa")
    run(b, "checkout", "docs/two.txt", machine="bbb")
    # B changes two.txt after its last snapshot: not the base version any more
    (b / "docs/two.txt").write_bytes(b"changed on b, never committed\n")
    sync(b, "bbb")
    assert not (b / "docs/one.txt").exists()
    assert (b / "docs/two.txt").read_bytes() == b"changed on b, never committed\n"


def test_modified_there_replaces_only_the_base_version(tmp_path):
    t, a, b = two(tmp_path)
    (a / "docs/one.txt").write_bytes(b"one, newer\n")
    sync(a, "aaa")
    sync(b, "bbb")
    assert is_stub(b / "docs/one.txt")
    run(b, "checkout", "docs/one.txt", machine="bbb")
    assert (b / "docs/one.txt").read_bytes() == b"one, newer\n"


# -- races and kills -------------------------------------------------------------------------------
_BARRIER = r"""
import os, sys, time
from jam_core.history import store
real = store.write_head
def write_head(remote, name, sid, size, pm, session):
    gate = os.environ["GATE"]
    open(gate + "." + os.environ["JAM_MACHINE_ID"], "w").close()
    while not os.path.exists(gate + ".go"):  # released together by the test
        time.sleep(0.001)
    return real(remote, name, sid, size, pm, session)
store.write_head = write_head
from jam_core.cli import main
sys.argv = ["jam", "sync"]
main()
"""


def test_concurrent_syncs_lose_no_snapshot(tmp_path):
    t, a, b = two(tmp_path)
    (a / "from-a").write_bytes(b"a\n")
    (b / "from-b").write_bytes(b"b\n")
    gate = str(tmp_path / "gate")
    procs = []
    for root, m in ((a, "aaa"), (b, "bbb")):
        env = dict(os.environ, JAM_MACHINE_ID=m, GATE=gate)
        procs.append(subprocess.Popen([sys.executable, "-c", _BARRIER], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    import time

    deadline = time.monotonic() + 60
    while not (os.path.exists(gate + ".aaa") and os.path.exists(gate + ".bbb")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    Path(gate + ".go").write_bytes(b"")  # both at the instant before their first head write
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert b"Traceback" not in err, err
    for _ in range(2):
        sync(a, "aaa", check=None)
        sync(b, "bbb", check=None)
    for root in (a, b):
        assert (root / "from-a").exists() and (root / "from-b").exists()
    sync(a, "aaa")
    assert (a / ".jam/history/HEAD").read_text() == (b / ".jam/history/HEAD").read_text()


_KILL = r"""
import os, sys
from jam_core.history import clone
real = clone.make_entry
def make_entry(*args, **kw):
    os.kill(os.getpid(), 9)  # killed at the merge's first file write
clone.make_entry = make_entry
from jam_core.cli import main
sys.argv = ["jam", "sync"]
main()
"""


def test_sigkill_mid_sync_loses_nothing_and_the_next_sync_completes(tmp_path):
    t, a, b = two(tmp_path)
    (a / "docs/three.txt").write_bytes(b"three\n")
    (a / "docs/one.txt").unlink()
    sync(a, "aaa")
    (b / "mine.txt").write_bytes(b"mine\n")
    env = dict(os.environ, JAM_MACHINE_ID="bbb")
    p = subprocess.run([sys.executable, "-c", _KILL], cwd=b, env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert (b / "mine.txt").read_bytes() == b"mine\n"
    sync(b, "bbb")
    assert (b / "mine.txt").read_bytes() == b"mine\n"
    assert (b / "docs/three.txt").exists() and not (b / "docs/one.txt").exists()
    assert not [n for n in os.listdir(b / "docs") if n.startswith(".jam-")], "no leftover"
    sync(a, "aaa")
    assert (a / "mine.txt").exists()


# -- hostile metadata on the remote ----------------------------------------------------------------
def _store(remote: Path, stored: bytes, sid: str) -> None:
    hexd = sid.partition(":")[2]
    path = remote / "objects" / "b3" / hexd[:2] / hexd
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stored)


def _head(remote: Path, tree: str, machine: str, sid: str, size: int) -> None:
    d = remote / "meta/history" / tree
    d.mkdir(parents=True, exist_ok=True)
    (d / machine).write_bytes(f"jam-head 1\n{sid}\n{size}\n".encode())


def test_a_hostile_snapshot_is_refused_with_one_line(tmp_path):
    t, a, b = two(tmp_path)
    good = Snapshot([], 1, "evil", "evil", "a", "", [], [Item("x", FILE, "b3:" + "0" * 64, 1, 0o644, 1)])
    stored = encode(good)
    text = zlib.decompress(stored).replace(b'"x"', b'"../x"')
    bad = zlib.compress(text)
    from jam_core.history.snapshot import id_of

    sid = id_of(bad)
    _store(t.remote, bad, sid)
    _head(t.remote, "a", "evil", sid, len(bad))
    res = sync(b, "bbb", check=1)
    assert "refused" in res.err and not (tmp_path / "x").exists()
    assert "Traceback" not in res.err
    # a clone of that tree refuses it too
    res = run(tmp_path, "clone", str(t.remote), str(tmp_path / "c"), machine="ccc", check=1)
    assert res.err.startswith("jam: ") and "refused" in res.err and len(res.err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_head_naming_bytes_of_another_id_is_refused(tmp_path):
    t, a, b = two(tmp_path)
    good = Snapshot([], 1, "evil", "evil", "a", "", [], [])
    stored = encode(good)
    wrong = "b3:" + "1" * 64
    _store(t.remote, stored, wrong)  # the bytes under another id
    _head(t.remote, "a", "evil", wrong, len(stored))
    res = sync(b, "bbb", check=1)
    assert "refused" in res.err or "corrupt" in res.err or "does not match" in res.err, res.err


def test_conflict_name_is_dropbox_like_and_safe():
    from jam_core.history.sync import conflict_name

    day = __import__("time").strftime("%Y-%m-%d", __import__("time").localtime(0))
    assert conflict_name("d/report.txt", "laptop", 0) == f"d/report (conflicted copy from laptop {day}).txt"
    assert conflict_name("Makefile", "x/../../y", 0) == f"Makefile (conflicted copy from x-..-..-y {day})"
    assert "/" not in conflict_name("a", "h/../../etc", 0)
    long = conflict_name("n" * 250 + ".txt", "h", 0)
    assert len(long.encode()) <= 255


# -- through sftp ----------------------------------------------------------------------------------
def test_clone_and_sync_through_sftp(tmp_path, sshd, sftp_store):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    a = tmp_path / "a"
    a.mkdir()
    root, _ = Root.init(a, default_remote=False)
    url = f"sftp://{sshd.alias}{sftp_store}"
    add_remote(root, make_plugin_manager(), "far", url)
    (a / "f.txt").write_bytes(b"over ssh\n")
    run(a, "commit", machine="aaa")  # a commit's push registers the tree (sftp lists files only)
    b = tmp_path / "b"
    run(tmp_path, "clone", url, str(b), machine="bbb")  # no --tree: the registry names it
    assert is_stub(b / "f.txt")
    (b / "g.txt").write_bytes(b"from b\n")
    sync(b, "bbb")
    sync(a, "aaa")
    run(a, "checkout", "g.txt", machine="aaa")
    assert (a / "g.txt").read_bytes() == b"from b\n"


def _sync_with_edit_after_commit(root, machine, monkeypatch, edit):
    """``sync`` in this process, ``edit()`` run at the instant its first commit returns (the
    user saves a file between the commit and the merge)."""
    from jam_core.history import store
    from jam_core.history.sync import sync as sync_
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root

    monkeypatch.setenv("JAM_MACHINE_ID", machine)
    real = store.commit
    calls = []

    def commit(*args, **kw):
        out = real(*args, **kw)
        if not calls:
            edit()
        calls.append(1)
        return out

    monkeypatch.setattr(store, "commit", commit)
    return sync_(Root.find(root), make_plugin_manager())


def test_a_file_changed_after_the_commit_is_never_removed_or_replaced(tmp_path, monkeypatch):
    t, a, b = two(tmp_path)
    (a / "docs/one.txt").unlink()
    (a / "docs/two.txt").write_bytes(b"two, newer on a\n")
    sync(a, "aaa")
    run(b, "checkout", "docs", machine="bbb")

    def edit():
        (b / "docs/one.txt").write_bytes(b"saved on b at the last instant\n")
        (b / "docs/two.txt").write_bytes(b"two, saved on b at the last instant\n")

    out = _sync_with_edit_after_commit(b, "bbb", monkeypatch, edit)
    assert (b / "docs/one.txt").read_bytes() == b"saved on b at the last instant\n"
    assert (b / "docs/two.txt").read_bytes() == b"two, saved on b at the last instant\n"
    assert {p for p, _why in out.kept} >= {"docs/one.txt", "docs/two.txt"}


def test_a_file_open_for_writing_is_never_removed_or_replaced(tmp_path):
    """Invariant 11 for sync: B's copies of a file deleted on A and of one modified on A are held
    open for writing by a program (nothing written yet: their bytes are still the base version).
    Sync keeps both; what the program then writes is in the files, not in unlinked inodes."""
    t, a, b = two(tmp_path)
    run(b, "checkout", "docs", machine="bbb")
    (a / "docs/two.txt").unlink()
    (a / "docs/one.txt").write_bytes(b"one, newer on a\n")
    sync(a, "aaa")
    for name in ("one.txt", "two.txt"):
        os.chmod(b / "docs" / name, 0o644)
    held = {name: os.open(b / "docs" / name, os.O_WRONLY) for name in ("one.txt", "two.txt")}
    try:
        res = sync(b, "bbb", check=None)
        assert "open for writing" in res.out + res.err
        for name, fd in held.items():
            os.pwrite(fd, f"{name}: the program's save\n".encode(), 0)
    finally:
        for fd in held.values():
            os.close(fd)
    for name in ("one.txt", "two.txt"):
        assert (b / "docs" / name).read_bytes().startswith(f"{name}: the program's save\n".encode()), name


_KILL_AFTER_MERGE = r"""
import os, sys
from jam_core.history import store
real, calls = store.commit, []
def commit(*args, **kw):
    calls.append(1)
    if len(calls) == 2:  # the merge is done, its stubs are in the tree: killed before the last commit
        os.kill(os.getpid(), 9)
    return real(*args, **kw)
store.commit = commit
from jam_core.cli import main
sys.argv = ["jam", "sync"]
main()
"""


def test_gc_keep_elsewhere_never_strands_a_stub_a_sync_just_made(tmp_path):
    """aaa commits new.bin; bbb's sync makes its stub and is killed before its last commit (which
    would publish bbb's refs); aaa deletes new.bin, commits and runs `gc --keep "last 1"`. The
    object of bbb's stub must stay: the sync recorded it on the remote before making the stub,
    as a clone does. Guard (mutation-checked): sync._refer's before_store."""
    t, a, b = two(tmp_path)
    data = os.urandom(70_000)
    (a / "new.bin").write_bytes(data)
    run(a, "commit", "-m", "new", machine="aaa")
    env = dict(os.environ, JAM_MACHINE_ID="bbb")
    p = subprocess.run([sys.executable, "-c", _KILL_AFTER_MERGE], cwd=b, env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert is_stub(b / "new.bin")
    (a / "new.bin").unlink()
    run(a, "commit", "-m", "gone", machine="aaa")
    run(a, "gc", "--keep", "last 1", machine="aaa", check=None)
    run(b, "checkout", "new.bin", machine="bbb")
    assert (b / "new.bin").read_bytes() == data


def test_sync_merges_no_head_whose_objects_another_root_is_removing_now(tmp_path):
    """Another root has said on the remote that it is removing new.bin's object at this moment
    (meta/removing/<its id>): bbb's sync must not make a stub of it (one line, exit 1), and the
    next sync, once that removal is over, merges it. Guard (mutation-checked): sync._refer's
    removing_elsewhere check."""
    from jam_core.ops.refs import encode

    t, a, b = two(tmp_path)
    data = os.urandom(70_000)
    (a / "new.bin").write_bytes(data)
    run(a, "commit", "-m", "new", machine="aaa")
    intent = t.remote / "meta" / "removing" / ("e" * 32)
    intent.parent.mkdir(parents=True, exist_ok=True)
    intent.write_bytes(encode(1, ["b3:" + b3(a / "new.bin")]))
    res = sync(b, "bbb", check=1)
    assert "another root is removing 1 of its object(s)" in res.err, res.err
    assert not os.path.lexists(b / "new.bin")
    intent.write_bytes(b"")  # that removal is over
    sync(b, "bbb")
    run(b, "checkout", "new.bin", machine="bbb")
    assert (b / "new.bin").read_bytes() == data

"""Issue 15: `jam clone` builds the root aside (PATH/.jam-<hex>.tmp, a mark in its .jam) and moves
it into PATH when complete; a clone killed part-way (SIGKILL injected at the exact instant, in a
subprocess that monkeypatches the function running then) is finished or begun again by the same
`jam clone URL PATH`, and a PATH holding anything else is never touched. Real files, real xattrs,
the real `jam` command."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from jam_core.history.snapshot import FILE, Item, Snapshot, SnapshotError, encode, parse
from jam_core.stub import HEADER_MAX, StubRecord, read_record
from tests.safety_support import JAM, b3, is_stub, make_tree, run_jam

FILES = {f"d{d}/f{i}.txt": f"file {d}/{i}\n".encode() * (i + 1) for d in range(3) for i in range(4)}
FILES["top.bin"] = os.urandom(70_000)
FILES["zz/deep/er.txt"] = b"deeper\n"


def run(cwd, *args, machine: str = "bbb", check: int | None = 0):
    return run_jam(cwd, *args, machine=machine, check=check)


def source(tmp_path):
    t = make_tree(tmp_path, "a")
    for rel, data in FILES.items():
        (t.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (t.root / rel).write_bytes(data)
    (t.root / "empty").write_bytes(b"")
    os.symlink("top.bin", t.root / "link")
    run(t.root, "commit", "-m", "first", machine="aaa")
    return t


_KILL = r"""
import os, sys
{patch}
from jam_core.cli import main
sys.argv = ["jam", "clone", sys.argv[1], sys.argv[2]]
main()
"""

# the N-th call of a function kills the process (SIGKILL: no cleanup runs)
_AT = """
import {module} as m
real = m.{name}
calls = [0]
def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), 9)
    return real(*a, **k)
m.{name} = hooked
"""


def killed_clone(tmp_path, remote: Path, dest: Path, module: str, name: str, n: int) -> None:
    code = _KILL.format(patch=_AT.format(module=module, name=name, n=n))
    env = dict(os.environ, JAM_MACHINE_ID="bbb")
    p = subprocess.run([sys.executable, "-c", code, str(remote), str(dest)], cwd=tmp_path, env=env,
                       capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]


def check_clone(t, dest: Path) -> None:
    """Every file of the source is a correct stub in ``dest``, the clone is a registered root,
    nothing of the stage is left, and checkout brings the right bytes."""
    assert sorted(os.listdir(dest)) == sorted([".jam", "d0", "d1", "d2", "top.bin", "zz", "empty", "link"])
    assert not (dest / ".jam/cloning").exists()
    for rel, data in FILES.items():
        assert is_stub(dest / rel), rel
        rec = read_record(dest / rel)
        assert rec.oid == "b3:" + b3(t.root / rel) and rec.size == len(data), rel
    assert os.readlink(dest / "link") == "top.bin" and (dest / "empty").stat().st_size == 0
    home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share")
    assert str(dest) in (home / "jam/roots").read_text().splitlines()
    assert run(dest, "doctor").returncode == 0
    run(dest, "checkout", ".")
    for rel, data in FILES.items():
        assert b3(dest / rel) == b3(t.root / rel), rel


def test_a_clone_is_complete_and_leaves_no_stage(tmp_path):
    t = source(tmp_path)
    res = run(tmp_path, "clone", t.remote, tmp_path / "b")
    assert "16 entries" in res.out and "14 stubs" in res.out
    check_clone(t, tmp_path / "b")


@pytest.mark.parametrize("n", [1, 7])
def test_killed_while_building_the_rerun_begins_again(tmp_path, n):
    t = source(tmp_path)
    dest2 = tmp_path / "c"
    code = _KILL.format(patch=f"""
from jam_core.history import store
real = store.EntryMaker.make
calls = [0]
def make(self, *a, **k):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), 9)
    return real(self, *a, **k)
store.EntryMaker.make = make
""")
    p = subprocess.run([sys.executable, "-c", code, str(t.remote), str(dest2)], cwd=tmp_path,
                       env=dict(os.environ, JAM_MACHINE_ID="ccc"), capture_output=True)
    assert p.returncode == -signal.SIGKILL
    left = os.listdir(dest2)
    assert len(left) == 1 and left[0].startswith(".jam-"), "only the stage is in PATH"
    assert not (dest2 / ".jam").exists(), "PATH is no root while it is being built"
    run(tmp_path, "clone", t.remote, dest2, machine="ccc")
    check_clone(t, dest2)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_killed_while_moving_in_the_rerun_finishes(tmp_path, n):
    """renameat2's n-th call (moving the stage's top entries in, .jam the 6th and last)."""
    t = source(tmp_path)
    dest = tmp_path / "b"
    killed_clone(tmp_path, t.remote, dest, "jam_core.fs", "renameat2", n)
    assert not (dest / ".jam/config.toml").exists(), "not a root before .jam is moved in"
    res = run(tmp_path, "clone", t.remote, dest)
    assert "16 entries" in res.out
    check_clone(t, dest)


def test_killed_after_the_move_the_rerun_finishes(tmp_path):
    t = source(tmp_path)
    dest = tmp_path / "b"
    killed_clone(tmp_path, t.remote, dest, "jam_core.root", "register_root", 1)
    assert (dest / ".jam/cloning").exists()
    run(tmp_path, "clone", t.remote, dest)
    check_clone(t, dest)
    # finished: a third clone into it is refused (it is a root, not an unfinished clone)
    res = run(tmp_path, "clone", t.remote, dest, check=2)
    assert res.err.startswith("jam: ") and "not empty" in res.err


def test_a_user_file_beside_an_unfinished_clone_is_never_touched(tmp_path):
    t = source(tmp_path)
    dest = tmp_path / "b"
    code = _KILL.format(patch="""
from jam_core.history import store
real = store.EntryMaker.make
def make(self, *a, **k):
    os.kill(os.getpid(), 9)
store.EntryMaker.make = make
""")
    p = subprocess.run([sys.executable, "-c", code, str(t.remote), str(dest)], cwd=tmp_path,
                       env=dict(os.environ, JAM_MACHINE_ID="bbb"), capture_output=True)
    assert p.returncode == -signal.SIGKILL
    (stage,) = os.listdir(dest)
    (dest / "top.bin").write_bytes(b"the user's own\n")  # a name the clone would move in
    res = run(tmp_path, "clone", t.remote, dest, check=2)
    assert res.err.startswith("jam: ") and "not empty" in res.err and len(res.err.splitlines()) == 1
    assert (dest / "top.bin").read_bytes() == b"the user's own\n"
    assert (dest / stage / ".jam/cloning").exists(), "the stage is left as it is"


def test_an_unfinished_clone_of_another_remote_is_refused(tmp_path):
    t = source(tmp_path)
    other = make_tree(tmp_path, "o")
    (other.root / "x").write_bytes(b"x")
    run(other.root, "commit", machine="ooo")
    dest = tmp_path / "b"
    killed_clone(tmp_path, t.remote, dest, "jam_core.fs", "renameat2", 2)
    before = sorted(os.listdir(dest))
    res = run(tmp_path, "clone", other.remote, dest, check=2)
    assert res.err.startswith("jam: ") and "unfinished clone of another remote" in res.err
    assert sorted(os.listdir(dest)) == before
    res = run(tmp_path, "clone", t.remote, dest, "--tree", "other", check=2)  # another tree of the same remote
    assert res.err.startswith("jam: ") and "unfinished clone of tree 'a'" in res.err
    assert sorted(os.listdir(dest)) == before
    run(tmp_path, "clone", t.remote, dest)
    check_clone(t, dest)


def test_a_directory_named_like_a_stage_but_not_one_is_never_touched(tmp_path):
    t = source(tmp_path)
    dest = tmp_path / "b"
    fake = dest / ".jam-0123456789abcdef.tmp"
    (fake / ".jam").mkdir(parents=True)
    (fake / ".jam/cloning").write_text("not a mark\n")  # a mark that is not one: no remote recorded
    (fake / "mine").write_bytes(b"mine")
    res = run(tmp_path, "clone", t.remote, dest, check=2)  # only a mark jam wrote (naming a remote) is one
    assert res.err.startswith("jam: ") and "not empty" in res.err
    assert (fake / "mine").read_bytes() == b"mine"


def test_a_clone_in_progress_is_not_disturbed(tmp_path):
    t = source(tmp_path)
    dest = tmp_path / "b"
    killed_clone(tmp_path, t.remote, dest, "jam_core.fs", "renameat2", 2)
    (stage,) = [n for n in os.listdir(dest) if n.startswith(".jam-")]
    fd = os.open(dest / stage / ".jam/cloning", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the clone making it holds it
        res = run(tmp_path, "clone", t.remote, dest, check=2)
        assert "another jam clone is making" in res.err
        assert (dest / stage / ".jam/cloning").exists()
    finally:
        os.close(fd)
    run(tmp_path, "clone", t.remote, dest)
    check_clone(t, dest)


# -- the pieces -------------------------------------------------------------------------------------
def _reference_header(rec, name: str) -> bytes:
    """The header as json.dumps writes it (jam's format before the template)."""
    import json

    from jam_core.stub import MAGIC, VERSION

    meta = {"jam": VERSION, "id": rec.oid, "size": rec.size, "mode": f"{rec.mode:04o}", "mtime_ns": rec.mtime_ns,
            "remotes": list(rec.remotes), "stashed_at": rec.stashed_at, "name": name}
    data = MAGIC + ("This file is stored by jam: its content is on a remote, not on this disk.\n"
                    "Bring it back with:  jam checkout <this file>   (or cd into its directory with\n"
                    "the jam shell hook). Do not edit this placeholder.\n"
                    f"{json.dumps(meta, ensure_ascii=True, separators=(',', ':'))}\n").encode("ascii")
    return data if len(data) <= HEADER_MAX or not name else _reference_header(rec, "")


@pytest.mark.parametrize("name", ["f.txt", "é ü.txt", 'q"u\\o\te\n.txt', "\udcff-raw", "x" * 255, "y" * 4000])
@pytest.mark.parametrize("size", [1, 100, 5000])
def test_the_header_is_byte_for_byte_the_stub_format(name, size):
    """The stubs clone makes carry StubRecord.header: the json.dumps format, name dropped when too long."""
    for remotes in [(), ("origin",), ("a", 'b"c')]:
        rec = StubRecord("b3:" + "ab" * 32, size, 0o640, -5, remotes, "2026-12-01T10:00:00Z")
        got, want = rec.header(name), _reference_header(rec, name)
        assert got == want and len(got) <= HEADER_MAX


def _snap(paths: list[str]) -> bytes:
    good = Snapshot([], 1, "h", "m", "t", "", [], [Item(f"p{i}", FILE, "b3:" + "0" * 64, 1, 0o644, 1)
                                                   for i in range(len(paths))])
    text = zlib.decompress(encode(good))
    for i, p in enumerate(paths):
        text = text.replace(f'"p{i}"'.encode(), json.dumps(p).encode(), 1)
    return zlib.compress(text)


@pytest.mark.parametrize("paths", [["a/./b"], ["a/../b"], ["../b"], ["a//b"], ["/etc/x"], ["a/"], [".jam/x"],
                                   [".jam"], ["."], ["a\u0000b"], ["a", "a.txt", "a/b"], ["a", "a/b/c"]])
def test_parse_refuses_bad_paths(paths):
    with pytest.raises(SnapshotError, match="both a file and a directory" if len(paths) > 1 else "bad path"):
        parse(_snap(paths))


def test_parse_accepts_names_that_are_not_ascii_and_siblings():
    paths = ["a.txt", "a/b", "a/c", "b/c/d", "b/c/e", "b/d", "z/.jam", "é/ü", "é/ü.d/x"]
    assert [i.path for i in parse(_snap(paths)).items] == paths


def test_killed_as_the_stage_was_made_the_rerun_begins_again(tmp_path):
    """Killed after the stage and its empty mark were made, before the mark was written."""
    t = source(tmp_path)
    dest = tmp_path / "b"
    killed_clone(tmp_path, t.remote, dest, "jam_core.history.clone", "_lock_mark", 1)
    (stage,) = os.listdir(dest)
    assert os.listdir(dest / stage / ".jam") == ["cloning"] and (dest / stage / ".jam/cloning").stat().st_size == 0
    run(tmp_path, "clone", t.remote, dest)
    check_clone(t, dest)


def test_a_full_disk_clones_nothing_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC at the third entry: one line, no half root, PATH (made by the clone) removed."""
    import errno

    from jam_core.errors import JamError
    from jam_core.history import clone, store
    from jam_core.manager import make_plugin_manager

    t = source(tmp_path)
    monkeypatch.setenv("JAM_MACHINE_ID", "bbb")
    real, calls = store.EntryMaker.make, [0]

    def make(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(store.EntryMaker, "make", make)
    with pytest.raises(JamError, match="No space left on device; nothing cloned"):
        clone.clone(str(t.remote), tmp_path / "b", make_plugin_manager())
    assert not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()  # an empty PATH the user made stays, empty
    calls[0] = 0
    with pytest.raises(JamError):
        clone.clone(str(t.remote), tmp_path / "c", make_plugin_manager())
    assert os.listdir(tmp_path / "c") == []


def test_the_cd_index_is_the_one_the_catalog_gives(tmp_path):
    from jam_core.hook.index import index_path, refresh
    from jam_core.root import Root

    t = source(tmp_path)
    run(tmp_path, "clone", t.remote, tmp_path / "b")
    root = Root(tmp_path / "b")

    def walk():
        top = index_path(root)
        return sorted((os.path.relpath(d, top), sorted(f)) for d, _s, f in os.walk(top))

    made = walk()
    assert len(made) > 3
    refresh(root)  # from every stub the catalog holds
    assert walk() == made

"""Faults around copies, caches and pools (issue 12), each injected at its exact instant on real
files, real xattrs and real dir remotes: edge-cache expiry, a `jam drop` / `jam gc` killed at
the instant of a removal, pools on real tmpfs mounts that fill up, `jam remote remove
--move-to`, and doctor on a corrupt mirror. What tests/test_copies.py covers is not repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.objects import object_relpath
from jam_core.ops.checkout import checkout
from jam_core.ops.refs import decode
from jam_core.ops.remotes import add_remote
from jam_core.ops.stash import stash
from jam_core.root import CATALOG, Root
from jam_core.scan import LOCAL, STUB, walk
from tests.conftest import make_file
from tests.safety_support import JAM, b3

DAY = 86400.0


@pytest.fixture
def pm():
    return make_plugin_manager()


def _root(tmp_path: Path, name: str, remotes: dict[str, tuple[Path, int, dict]], copies: int = 1, pm=None) -> Root:
    """A root with dir remotes ``{name: (location, tier, options)}`` and ``[place] copies``."""
    pm = pm or make_plugin_manager()
    path = tmp_path / name
    path.mkdir()
    root, _ = Root.init(path, default_remote=False)
    for rname, (loc, tier, opts) in remotes.items():
        loc.mkdir(exist_ok=True)
        add_remote(root, pm, rname, str(loc), tier, options=opts)
    with root.lock():
        root.update_config(lambda own: own.setdefault("place", {}).__setitem__("copies", copies))
    return Root.find(path)


def _obj(loc: Path, oid: str) -> Path:
    return loc / "objects" / object_relpath(oid)


def _holds(loc: Path, oid: str) -> bool:
    return _obj(loc, oid).is_file()


def _intact(loc: Path, oid: str) -> bool:
    p = _obj(loc, oid)
    return p.is_file() and "b3:" + b3(p) == oid


def _oid(root: Root, rel: str) -> str:
    for e in walk(str(root.path), rel):
        assert e.state == STUB, (rel, e.state)
        return e.record.oid
    raise AssertionError(rel)


def _state(root: Root, rel: str):
    return [e.state for e in walk(str(root.path), rel)][0]


def _corrupt(loc: Path, oid: str) -> None:
    """Flip bytes of a copy in place (same size: only a hash finds it)."""
    p = _obj(loc, oid)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"\xff" * 16)


def _intents(loc: Path) -> dict[str, set[str]]:
    d = loc / "meta" / "removing"
    if not d.is_dir():
        return {}
    return {p.name: decode(p.read_bytes())[1] for p in d.iterdir()}


def _jam(args, cwd, env=None, check=None) -> subprocess.CompletedProcess:
    res = subprocess.run([JAM, *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    if check is not None:
        assert res.returncode == check, (args, res.returncode, res.stdout, res.stderr)
    return res


# -- 1. edge-cache expiry ---------------------------------------------------------------------------------

def _edge_root(tmp_path, pm):
    edge, far = tmp_path / "edge", tmp_path / "far"
    root = _root(tmp_path, "r", {"edge": (edge, 0, {"cache": "7d"}), "far": (far, 1, {})}, pm=pm)
    data = {}
    for i, name in enumerate(("old.bin", "used.bin", "lonely.bin")):
        data[name] = make_file(root.path / name, 150_000, seed=10 + i)
    res = stash(root, list(data), pm)
    assert res.exit_code == 0, res
    oids = {n: _oid(root, n) for n in data}
    for oid in oids.values():  # stash lands every object on the edge and on the far tier
        assert _intact(edge, oid) and _intact(far, oid)
    return root, edge, far, data, oids


def test_edge_expiry_removes_only_unused_copies_held_elsewhere(tmp_path, pm):
    from jam_core.catalog import Catalog
    from jam_core.ops.gc import gc

    root, edge, far, data, oids = _edge_root(tmp_path, pm)
    now = time.time()
    later = now + 8 * DAY  # the clock gc reads, moved forward past the cache's 7 days
    with Catalog(root.jam_dir / CATALOG) as cat:
        cat.record_use(["used.bin"], later - 1 * DAY)  # used yesterday (as seen from `later`)
    _corrupt(far, oids["lonely.bin"])  # its only durable copy is bad: the edge copy is the last good one

    dry = gc(root, pm, dry_run=True, now=now)  # within 7 days nothing expires
    assert dry.expired == [] and dry.removed == []

    out = gc(root, pm, now=later)
    expired = {o for _r, o, _s in out.expired}
    assert expired == {oids["old.bin"]}, out
    assert not _holds(edge, oids["old.bin"]) and _intact(far, oids["old.bin"])  # the far copy stays
    assert _intact(edge, oids["used.bin"])  # used recently: its edge copy stays
    assert _intact(edge, oids["lonely.bin"])  # the far copy is corrupt: the edge copy is kept
    assert [(r, o) for r, o, _w in out.kept] == [("edge", oids["lonely.bin"])], out.kept
    assert _intents(edge) and not any(_intents(edge).values())  # the removal intent was emptied

    # the far copy missing instead of corrupt: kept as well
    _obj(far, oids["lonely.bin"]).unlink()
    out = gc(root, pm, now=later)
    assert _intact(edge, oids["lonely.bin"]) and not out.expired

    # checkout from the far tier puts the object back on the edge
    res = checkout(root, ["old.bin"], pm)
    assert res.exit_code == 0, res
    assert (root.path / "old.bin").read_bytes() == data["old.bin"], "differs"
    assert _intact(edge, oids["old.bin"])
    # ... and it counts as used from now: a gc a day later keeps it there
    out = gc(root, pm, now=time.time() + DAY)
    assert _intact(edge, oids["old.bin"]) and not out.expired


# -- 2. a removal killed at its instant --------------------------------------------------------------------

KILLER = '''
"""A test plugin: SIGKILLs its own jam process at the instant of a removal, just before the
backend removes the object (at=before) or just after (at=after)."""
import json
import os
import signal

from jam_core import hookimpl


@hookimpl(wrapper=True)
def remove(remote, oid, session):
    at = os.environ.get("JAM_TEST_KILL_AT")
    if at == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = yield
    if at == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
'''


@pytest.fixture
def killer_env(tmp_path):
    """An environment whose `jam` loads the killer plugin through the real entry-point group
    (a dist-info on PYTHONPATH), killing itself at the remove hook when JAM_TEST_KILL_AT is set."""
    site = tmp_path / "killer-site"
    (site / "jam_test_killer-0.1.dist-info").mkdir(parents=True)
    (site / "jam_test_killer.py").write_text(KILLER)
    (site / "jam_test_killer-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: jam-test-killer\nVersion: 0.1\n")
    (site / "jam_test_killer-0.1.dist-info" / "entry_points.txt").write_text("[jam]\nkiller = jam_test_killer\n")
    env = os.environ.copy()
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _killed(args, cwd, env, at: str) -> None:
    res = _jam(args, cwd, env={**env, "JAM_TEST_KILL_AT": at})
    assert res.returncode == -signal.SIGKILL, ("the kill did not land", res.returncode, res.stdout, res.stderr)


@pytest.mark.parametrize("at", ["before", "after"])
def test_drop_killed_at_the_removal(tmp_path, pm, killer_env, at):
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": (a, 0, {}), "b": (b, 1, {})}, pm=pm)
    data = make_file(root.path / "f.bin", 300_000, seed=1)
    _jam(["stash", "f.bin"], root.path, killer_env, check=0)
    oid = _oid(root, "f.bin")
    _jam(["copy", "--to", "b", "f.bin"], root.path, killer_env, check=0)
    assert _intact(a, oid) and _intact(b, oid)

    _killed(["drop", "--from", "a", "f.bin"], root.path, killer_env, at)
    assert _intact(b, oid)  # the copy the stub needs is never touched
    assert _holds(a, oid) == (at == "before")
    assert any(oid in oids for oids in _intents(a).values())  # the killed drop's intent is left behind

    res = _jam(["drop", "--from", "a", "f.bin"], root.path, killer_env, check=0)  # the next drop completes
    assert not _holds(a, oid) and _intact(b, oid)
    assert not any(_intents(a).values()), _intents(a)  # ... and cleans the intent
    res = _jam(["where", "--check", "--json", "f.bin"], root.path, killer_env, check=0)
    assert json.loads(res.stdout)[0]["remotes"] == ["b"], res.stdout
    _jam(["checkout", "f.bin"], root.path, killer_env, check=0)
    assert (root.path / "f.bin").read_bytes() == data, "differs"


@pytest.mark.parametrize("at", ["before", "after"])
def test_gc_killed_at_the_removal(tmp_path, pm, killer_env, at):
    a = tmp_path / "a"
    root = _root(tmp_path, "r", {"a": (a, 0, {})}, pm=pm)
    kept = make_file(root.path / "kept.bin", 300_000, seed=2)
    make_file(root.path / "gone.bin", 300_000, seed=3)
    _jam(["stash", "kept.bin", "gone.bin"], root.path, killer_env, check=0)
    k, g = _oid(root, "kept.bin"), _oid(root, "gone.bin")
    _jam(["checkout", "gone.bin"], root.path, killer_env, check=0)  # nothing refers to its object any more

    _killed(["gc"], root.path, killer_env, at)
    assert _intact(a, k)  # the object a stub needs is never touched
    assert _holds(a, g) == (at == "before")
    assert any(g in oids for oids in _intents(a).values())

    res = _jam(["gc"], root.path, killer_env, check=0)  # the next gc completes
    assert not _holds(a, g) and _intact(a, k), res.stdout
    assert not any(_intents(a).values()), _intents(a)  # ... and cleans the intent
    _jam(["checkout", "kept.bin"], root.path, killer_env, check=0)
    assert (root.path / "kept.bin").read_bytes() == kept, "differs"


# -- 4. jam remote remove NAME --move-to OTHER ---------------------------------------------------------------

def _three(tmp_path, pm):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    root = _root(tmp_path, "r", {"a": (a, 0, {}), "b": (b, 1, {}), "c": (c, 2, {})}, pm=pm)
    data = {n: make_file(root.path / n, 120_000, seed=20 + i) for i, n in enumerate(("x.bin", "y.bin", "z.bin"))}
    assert stash(root, list(data), pm).exit_code == 0  # all three on a (the nearest tier)
    oids = {n: _oid(root, n) for n in data}
    from jam_core.ops.copies import copy
    assert copy(root, ["y.bin"], pm, "b").exit_code == 0  # y is on b too: not only on a
    return root, (a, b, c), data, oids


def test_remote_remove_refuses_without_move_to(tmp_path, pm):
    root, (a, b, c), data, oids = _three(tmp_path, pm)
    res = _jam(["remote", "remove", "a"], root.path, check=2)  # not a terminal: no question asked
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jam: ") and "--move-to" in lines[0] and "--force" in lines[0], lines
    assert "a" in {r.name for r in Root.find(root.path).remotes()}


def test_remote_remove_move_to_moves_first_then_removes(tmp_path, pm):
    root, (a, b, c), data, oids = _three(tmp_path, pm)
    res = _jam(["remote", "remove", "a", "--move-to", "c"], root.path, check=0)
    assert "a" not in {r.name for r in Root.find(root.path).remotes()}, res.stdout
    for n in ("x.bin", "z.bin"):  # what only a held is on c, verified by hash
        assert _intact(c, oids[n]), n
    assert not _holds(c, oids["y.bin"])  # y was on b as well: nothing to move
    assert not any(_holds(a, o) for o in oids.values())  # and a no longer holds this root's objects
    a.rename(tmp_path / "a-gone")
    _jam(["checkout", "."], root.path, check=0)
    for n, d in data.items():
        assert (root.path / n).read_bytes() == d, n


def test_remote_remove_move_to_a_remote_that_is_down_removes_nothing(tmp_path, pm):
    root, (a, b, c), data, oids = _three(tmp_path, pm)
    c.rename(tmp_path / "c-unplugged")
    res = _jam(["remote", "remove", "a", "--move-to", "c"], root.path, check=1)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jam: ") and "'c'" in lines[0], lines
    assert "a" in {r.name for r in Root.find(root.path).remotes()}
    assert all(_intact(a, o) for o in oids.values())  # nothing removed from a


def test_remote_remove_move_to_verifies_on_the_target_before_anything_goes(tmp_path, pm, monkeypatch):
    """The copy on the target is damaged at the instant after it was stored: the move fails,
    nothing is dropped from the remote being removed, and the CLI would keep it configured."""
    from jam_core.ops import copies

    root, (a, b, c), data, oids = _three(tmp_path, pm)
    real = copies._transfer

    def damaged(root_, src, dest, oid, size, pm_, session):
        real(root_, src, dest, oid, size, pm_, session)
        _corrupt(c, oid)

    monkeypatch.setattr(copies, "_transfer", damaged)
    res = copies.move_off(root, pm, "a", "c")
    assert sorted(rel for rel, _why in res.failed) == ["x.bin", "z.bin"], res
    assert all(_intact(a, o) for o in oids.values())


# -- 5. doctor on a corrupt mirror ----------------------------------------------------------------------------

def test_doctor_reports_the_corrupt_mirror_and_fix_copies_it_again(tmp_path, pm):
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": (a, 0, {}), "b": (b, 0, {})}, copies=2, pm=pm)
    data = make_file(root.path / "f.bin", 250_000, seed=5)
    make_file(root.path / "ok.bin", 250_000, seed=6)
    _jam(["stash", "f.bin", "ok.bin"], root.path, check=0)
    oid = _oid(root, "f.bin")
    _corrupt(a, oid)  # same size: only a hash tells

    res = _jam(["doctor", "--deep", "--json"], root.path, check=1)
    found = [f for f in json.loads(res.stdout)["checks"] if f["kind"] == "corrupt"]
    assert [f["path"] for f in found] == ["f.bin"], found  # the file ...
    assert "'a'" in found[0]["detail"] and "the copy on 'b' is good" in found[0]["detail"], found  # ... and the remote
    assert not _intact(a, oid)  # doctor without --fix changes nothing

    res = _jam(["doctor", "--deep", "--fix", "--json"], root.path, check=0)
    found = [f for f in json.loads(res.stdout)["checks"] if f["kind"] == "corrupt"]
    assert len(found) == 1 and found[0]["fixed"] and "copied again from 'b'" in found[0]["detail"], found
    assert _intact(a, oid) and _intact(b, oid)
    res = _jam(["doctor", "--deep", "--json"], root.path, check=0)
    assert not [f for f in json.loads(res.stdout)["checks"] if f["kind"] == "corrupt"]
    b.rename(tmp_path / "b-gone")  # the repaired copy alone brings the file back
    _jam(["checkout", "f.bin"], root.path, check=0)
    assert (root.path / "f.bin").read_bytes() == data, "differs"


def test_doctor_fix_never_claims_a_copy_the_remote_does_not_hold(tmp_path, pm, monkeypatch):
    """A backend that answers "stored" for the re-copy but still holds the corrupt bytes: the
    fix is checked by hashing in place and the finding stays unfixed."""
    import jam_dir as jd
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor

    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": (a, 0, {}), "b": (b, 0, {})}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 250_000, seed=5)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    _corrupt(a, oid)
    liar = jd.hookimpl(tryfirst=True)(lambda remote, oid, source, size, session: True)  # "stored", nothing changed
    monkeypatch.setattr(jd, "stash", liar)
    with Session() as s:
        res = doctor(root, ".", make_plugin_manager(), s, deep=True, fix=True)
    found = [f for f in res.findings if f.kind == "corrupt"]
    assert len(found) == 1 and not found[0].fixed and "not copied again" in found[0].detail, found
    assert res.exit_code == 1 and not _intact(a, oid)


# -- 3. pools on real tmpfs mounts ----------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes under tmp_path; unmounted at the end."""
    from tests.conftest import require_tool

    mount, umount = require_tool("mount"), require_tool("umount")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the tmpfs pool tests need root (CI runs as root)")
        pytest.skip("mounting tmpfs needs root")
    mounted: list[Path] = []

    def make(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        if subprocess.run([umount, str(point)]).returncode != 0:
            subprocess.run([umount, "-l", str(point)])


def _pool(tmp_path, tmpfs, pm, small: int, large: int):
    """Remotes "a" (small tmpfs) and "b" (large tmpfs), one tier: a pool."""
    sa, sb = tmpfs(small), tmpfs(large)
    a, b = sa / "remote", sb / "remote"
    root = _root(tmp_path, "r", {"a": (a, 0, {}), "b": (b, 0, {})}, pm=pm)
    return root, a, b


def _placed(root: Root, names, a: Path, b: Path) -> dict[str, str]:
    """Where each stubbed file's object is (exactly one pool member, intact)."""
    out = {}
    for n in names:
        if _state(root, n) != STUB:
            continue
        oid = _oid(root, n)
        on = [name for name, loc in (("a", a), ("b", b)) if _holds(loc, oid)]
        assert len(on) == 1 and _intact(a if on == ["a"] else b, oid), (n, on)
        out[n] = on[0]
    return out


def test_pool_on_tmpfs_spreads_by_free_space(tmp_path, tmpfs, pm):
    root, a, b = _pool(tmp_path, tmpfs, pm, 1 << 20, 3 << 20)
    names = [f"f{i:02}.bin" for i in range(40)]  # 40 x 64 KiB = 2.5 MiB
    data = {n: b3_bytes(make_file(root.path / n, 64 << 10, seed=100 + i)) for i, n in enumerate(names)}
    res = stash(root, names, pm)
    assert res.exit_code == 0, res
    placed = _placed(root, names, a, b)
    assert len(placed) == len(names)
    on_a = sum(1 for v in placed.values() if v == "a")
    assert 0 < on_a < len(names) - on_a, placed  # the fuller one receives fewer, but some
    assert checkout(root, names, pm).exit_code == 0
    assert all(b3(root.path / n) == d for n, d in data.items()), "differs"


def test_pool_member_filled_by_someone_else_loses_nothing(tmp_path, tmpfs, pm, monkeypatch):
    """At the instant after jam read the pool's free space, another writer fills remote "a":
    every file is either a stub whose object is intact on one member or still local and
    intact; the command says why (exit 1), and the next stash puts the rest on "b"."""
    from jam_core.ops import stash as stash_mod

    root, a, b = _pool(tmp_path, tmpfs, pm, 3 << 20, 2 << 20)
    names = [f"f{i:02}.bin" for i in range(24)]  # 1.5 MiB: would fit on either
    data = {n: b3_bytes(make_file(root.path / n, 64 << 10, seed=200 + i)) for i, n in enumerate(names)}
    real = stash_mod._free_space

    def read_then_fill(remotes, pm_, session):
        free = real(remotes, pm_, session)
        with open(a.parent / "someone-else", "wb") as f:  # leaves "a" about 100 KiB
            f.write(os.urandom(os.statvfs(a).f_bavail * os.statvfs(a).f_frsize - (100 << 10)))
        return free

    monkeypatch.setattr(stash_mod, "_free_space", read_then_fill)
    res = stash(root, names, pm)
    monkeypatch.undo()
    assert res.exit_code == 1, res
    why = " ".join(w for _r, w in res.failed + res.skipped) + " " + str(res.aborted or "")
    assert "no space left" in why, res
    placed = _placed(root, names, a, b)
    for n in names:  # nothing lost: each file is a good stub or the original
        if n not in placed:
            assert _state(root, n) == LOCAL and b3(root.path / n) == data[n], n
    assert 0 < len(placed) < len(names) and "b" in placed.values(), placed  # the command went on with "b"

    res = stash(root, names, pm)  # free space read afresh: the rest goes to "b"
    assert res.exit_code == 0, res
    again = _placed(root, names, a, b)
    assert len(again) == len(names)
    assert all(again[n] == "b" for n in names if n not in placed), again
    assert checkout(root, names, pm).exit_code == 0
    assert all(b3(root.path / n) == d for n, d in data.items()), "differs"


def b3_bytes(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()

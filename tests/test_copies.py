"""Copies, mirrors, where/copy/move/drop and gc on real dir remotes (real files, real xattrs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jam_core import hookimpl
from jam_core.manager import make_plugin_manager
from jam_core.objects import object_relpath
from jam_core.ops.checkout import checkout
from jam_core.ops.remotes import add_remote
from jam_core.ops.stash import stash
from jam_core.root import Root
from jam_core.scan import STUB, walk
from tests.conftest import make_file


def _root(tmp_path: Path, name: str, remotes: dict[str, Path], copies: int = 1, pm=None) -> Root:
    pm = pm or make_plugin_manager()
    path = tmp_path / name
    path.mkdir()
    root, _ = Root.init(path, default_remote=False)
    for rname, loc in remotes.items():
        loc.mkdir(exist_ok=True)
        add_remote(root, pm, rname, str(loc), 0)
    with root.lock():
        root.update_config(lambda own: own.setdefault("place", {}).__setitem__("copies", copies))
    return root


def _holds(loc: Path, oid: str) -> bool:
    return (loc / "objects" / object_relpath(oid)).is_file()


def _oid(root: Root, rel: str) -> str:
    for e in walk(str(root.path), rel):
        assert e.state == STUB
        return e.record.oid
    raise AssertionError(rel)


@pytest.fixture
def pm():
    return make_plugin_manager()


def test_copies_two_stores_on_both_mirrors(tmp_path, pm):
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, copies=2, pm=pm)
    data = make_file(root.path / "f.bin", 200_000)
    res = stash(root, ["f.bin"], pm)
    assert res.exit_code == 0, res
    oid = _oid(root, "f.bin")
    assert _holds(a, oid) and _holds(b, oid)
    assert b"copies 2" in (a / "meta" / "refs").joinpath(root.config["core"]["id"]).read_bytes()
    res = checkout(root, ["f.bin"], pm)
    assert (root.path / "f.bin").read_bytes() == data


def test_copies_two_with_one_mirror_down_stays_local(tmp_path, pm):
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, copies=2, pm=pm)
    data = make_file(root.path / "f.bin", 200_000)
    b.rename(tmp_path / "b-unplugged")
    res = stash(root, ["f.bin"], pm)
    assert res.exit_code == 1
    assert (root.path / "f.bin").read_bytes() == data
    assert not list(walk(str(root.path), "f.bin"))[0].state == STUB


def test_copies_more_than_remotes_stays_local(tmp_path, pm):
    root = _root(tmp_path, "r", {"a": tmp_path / "a"}, copies=2, pm=pm)
    data = make_file(root.path / "f.bin", 200_000)
    res = stash(root, ["f.bin"], pm)
    assert res.exit_code == 1 and "copies = 2" in res.skipped[0][1]
    assert (root.path / "f.bin").read_bytes() == data


def test_corrupt_mirror_fetches_from_the_other(tmp_path, pm):
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, copies=2, pm=pm)
    data = make_file(root.path / "f.bin", 200_000)
    stash(root, ["f.bin"], pm)
    oid = _oid(root, "f.bin")
    obj = a / "objects" / object_relpath(oid)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"X" * 10)
    res = checkout(root, ["f.bin"], pm)
    assert res.exit_code == 0
    assert (root.path / "f.bin").read_bytes() == data


def test_pool_spreads_by_free_space(tmp_path, pm, monkeypatch):
    """Two remotes of one tier: each object goes where the most space is free, lowered as
    objects are placed (free_space read once)."""
    import jam_dir as jd  # the module the plugin manager loads (the entry point), not a second copy

    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, copies=1, pm=pm)
    free = {str(a): 450_000, str(b): 300_000}
    monkeypatch.setattr(jd, "free_space", jd.hookimpl(lambda remote, session: free[remote.location]))
    pm2 = make_plugin_manager()
    for i in range(3):
        make_file(root.path / f"f{i}.bin", 100_000, seed=i)
    assert stash(root, ["f0.bin", "f1.bin", "f2.bin"], pm2).exit_code == 0
    on_a = [i for i in range(3) if _holds(a, _oid(root, f"f{i}.bin"))]
    on_b = [i for i in range(3) if _holds(b, _oid(root, f"f{i}.bin"))]
    assert (len(on_a), len(on_b)) == (2, 1), (on_a, on_b)  # 450k, then 350k > 300k, then 250k < 300k


def test_drop_keeps_the_last_copy_and_drops_a_spare(tmp_path, pm):
    from jam_core.ops.copies import drop

    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    stash(root, ["f.bin"], pm)
    oid = _oid(root, "f.bin")
    res = drop(root, ["f.bin"], pm, "a")  # copies = 2: one left would be too few
    assert res.exit_code == 1 and _holds(a, oid)
    with root.lock():
        root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    res = drop(root, ["f.bin"], pm, "a")
    assert res.exit_code == 0 and not _holds(a, oid) and _holds(b, oid)
    res = drop(root, ["f.bin"], pm, "b")  # the only copy: never
    assert res.exit_code == 1 and _holds(b, oid)


def test_copy_and_move(tmp_path, pm):
    from jam_core.ops.copies import copy, move, where

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    root = _root(tmp_path, "r", {"a": a, "b": b, "c": c}, pm=pm)
    data = make_file(root.path / "f.bin", 200_000)
    stash(root, ["f.bin"], pm)
    oid = _oid(root, "f.bin")
    assert copy(root, ["f.bin"], pm, "b").exit_code == 0 and _holds(b, oid)
    assert move(root, ["f.bin"], pm, "a", "c").exit_code == 0
    assert not _holds(a, oid) and _holds(c, oid)
    rows, _ = where(root, ["f.bin"], pm, check=True)
    assert sorted(rows[0].known) == ["b", "c"]
    assert checkout(root, ["f.bin"], pm).exit_code == 0
    assert (root.path / "f.bin").read_bytes() == data


def test_concurrent_drop_from_two_roots_never_leaves_zero(tmp_path, pm, monkeypatch):
    """Roots A and B share mirrors a and b; A drops from a while, at the instant before A's
    removal, B (another process) drops from b. At most one goes: a copy always remains."""
    from jam_core.ops import copies
    from jam_core.ops.gc import gc

    a, b = tmp_path / "a", tmp_path / "b"
    ra = _root(tmp_path, "ra", {"a": a, "b": b}, copies=2, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a, "b": b}, copies=2, pm=pm)
    make_file(ra.path / "f.bin", 200_000)
    shutil.copy(ra.path / "f.bin", rb.path / "f.bin")
    stash(ra, ["f.bin"], pm)
    stash(rb, ["f.bin"], pm)
    oid = _oid(ra, "f.bin")
    for r in (ra, rb):
        with r.lock():
            r.update_config(lambda own: own["place"].__setitem__("copies", 1))
        gc(r, pm, dry_run=True)  # publishes the new copy count in the refs
    ran = []

    def b_drops(remote, o):
        ran.append(subprocess.run([str(Path(sys.executable).parent / "jam"), "drop", "--from", "b", "f.bin"],
                                  cwd=rb.path, capture_output=True, text=True, env=os.environ.copy()))

    monkeypatch.setattr(copies, "_about_to_remove", b_drops)
    copies.drop(ra, ["f.bin"], pm, "a")
    assert ran and "Traceback" not in ran[0].stderr, ran
    assert ran[0].returncode == 1 and "not removed from 'b'" in ran[0].stderr  # A's removal was under way
    assert _holds(b, oid) and not _holds(a, oid)


def test_gc_keeps_what_another_root_refers_to(tmp_path, pm):
    from jam_core.ops.gc import gc

    a = tmp_path / "a"
    ra = _root(tmp_path, "ra", {"a": a}, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a}, pm=pm)
    data = make_file(ra.path / "shared.bin", 200_000)
    (rb.path / "shared.bin").write_bytes(data)
    make_file(ra.path / "mine.bin", 200_000, seed=7)
    stash(ra, ["shared.bin", "mine.bin"], pm)
    stash(rb, ["shared.bin"], pm)
    shared, mine = _oid(ra, "shared.bin"), _oid(ra, "mine.bin")
    checkout(ra, ["shared.bin", "mine.bin"], pm)  # ra no longer refers to either
    dry = gc(ra, pm, dry_run=True)
    assert [o for _r, o, _s in dry.removed] == [mine] and _holds(a, mine)
    out = gc(ra, pm)
    assert out.exit_code == 0, out.problems
    assert not _holds(a, mine) and _holds(a, shared)
    assert checkout(rb, ["shared.bin"], pm).exit_code == 0


def test_cli_where_copy_drop_gc(tmp_path, pm, runner, monkeypatch):
    from jam_core.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    monkeypatch.chdir(root.path)
    assert runner.invoke(main, ["stash", "f.bin"]).exit_code == 0
    r = runner.invoke(main, ["copy", "--to", "b", "f.bin"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["where", "--json", "f.bin"])
    assert r.exit_code == 0 and '"b"' in r.output
    r = runner.invoke(main, ["drop", "--from", "nope", "f.bin"])
    assert r.exit_code == 2 and r.output.startswith("jam: no remote named")
    r = runner.invoke(main, ["gc", "--dry-run"])
    assert r.exit_code == 0 and "gc: would remove 0 unused objects" in r.output


def test_stash_never_swaps_onto_an_object_another_root_is_removing(tmp_path, pm):
    """Root B wrote its removal intent for an object and read the refs before root A's pending
    refs landed: B may remove it any moment. A stores the same content (the object is already
    there), then sees B's intent: the file stays local."""
    import blake3

    from jam_core.ops.refs import encode
    from jam_core.scan import LOCAL

    a = tmp_path / "a"
    root = _root(tmp_path, "r", {"a": a}, pm=pm)
    data = make_file(root.path / "f.bin", 200_000, seed=3)
    oid = "b3:" + blake3.blake3(data).hexdigest()
    (a / "meta" / "removing").mkdir(parents=True, exist_ok=True)
    (a / "meta" / "removing" / ("ab" * 16)).write_bytes(encode(1, [oid]))  # root B's intent
    res = stash(root, ["f.bin"], pm)
    assert not res.done and res.exit_code == 1, res
    assert "another root is removing" in str(res.failed + res.skipped)
    assert [e.state for e in walk(str(root.path), "f.bin")] == [LOCAL]
    assert (root.path / "f.bin").read_bytes() == data
    (a / "meta" / "removing" / ("ab" * 16)).write_bytes(b"")  # B is done
    assert stash(root, ["f.bin"], pm).done


class _TrustingStore:
    """A backend for remote "b" that stores what the core hands it without hashing it (as a
    simple third-party backend may): only the core's own check can keep corrupt bytes out."""

    def __init__(self, loc: Path):
        self.loc, self.stored = loc, []

    @hookimpl(tryfirst=True)
    def stash(self, remote, oid, source, size, session):
        if remote.name != "b":
            return None
        dest = self.loc / "objects" / object_relpath(oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(source).read_bytes())
        self.stored.append(oid)
        return True


def test_copy_never_stores_a_corrupt_copy_from_the_source(tmp_path):
    """`jam copy --to b` of an object whose copy on "a" rotted (same size, other bytes): the
    fetched bytes are hashed before anything is stored, so "b" never gets the bad copy, even
    through a backend that would store it unverified; one line, exit 1."""
    from jam_core.ops.copies import copy

    a, b = tmp_path / "a", tmp_path / "b"
    trusting = _TrustingStore(b)
    pm = make_plugin_manager(extra=(trusting,))
    root = _root(tmp_path, "r", {"a": a, "b": b}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    stash(root, ["f.bin"], pm)
    oid = _oid(root, "f.bin")
    obj = a / "objects" / object_relpath(oid)
    obj.chmod(0o644)
    good = obj.read_bytes()
    obj.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    res = copy(root, ["f.bin"], pm, "b")
    assert res.exit_code == 1 and trusting.stored == [] and not _holds(b, oid)
    assert any("corrupt" in why for _rel, why in res.failed), res.failed

"""Faults around copies, caches and pools (issue 12), each injected at its exact instant on real
files, real xattrs and real dir remotes: edge-cache expiry, a `jam drop` / `jam gc` killed at
the instant of a removal, pools on real tmpfs mounts that fill up, `jam remote remove
--move-to`, and doctor on a corrupt mirror. What tests/test_copies.py covers is not repeated."""

from __future__ import annotations

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

"""The dry-run's speed work (issue 13) changes nothing a user can see.

Entry-point discovery reads only the ``entry_points.txt`` of the distributions on ``sys.path``
(importlib.metadata, 40-70 ms of imports, only when one may declare the ``jam`` group): a
third-party plugin installed is still found (a plain dist-info, spellings importlib.metadata
accepts, a zip on sys.path, a finder that lists distributions its own way), one removed is
no longer loaded, and a FIFO planted as an ``entry_points.txt`` never hangs jam. A
third-party ``select`` plugin that no ``[policy.NAME]`` table names still answers the
dry-run (why the discovery cannot simply be skipped for roots of built-in policies).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jam_core import manager

NOMINATE_ALL = ("from jam_core import hookimpl, Nomination\n\n@hookimpl\n"
                "def select(records, purpose):\n"
                "    if purpose != 'stash':\n        return None\n"
                "    return [Nomination(r.path, 'greedy', 'greedy wants it') for r in records]\n")
QUIET = "from jam_core import hookimpl\n\n@hookimpl\ndef select(records):\n    return None\n"


def add_dist(site: Path, name: str, source: str = QUIET, entry_points: str | None = None) -> Path:
    """A real distribution in ``site`` with an entry point in jam's group; its dist-info."""
    mod = f"jam_{name}"
    (site / mod).mkdir(parents=True)
    (site / mod / "__init__.py").write_text(source)
    dist = site / f"{mod}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points if entry_points is not None else f"[jam]\n{name} = {mod}\n")
    return dist


def run(jam_bin, path: str, *args, cwd=None, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([jam_bin, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def plugin_names(out) -> set[str]:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return {p["name"] for p in json.loads(out.stdout) if p["broken"] is None}


def test_no_third_party_plugin_means_no_importlib_metadata(tmp_path):
    """The common case: nothing on sys.path declares the group, so importlib.metadata (and
    email, socket, zipfile with it) is never imported, and every built-in still loads."""
    code = ("import sys\nfrom jam_core.manager import make_plugin_manager, BUILTIN_PLUGINS\n"
            "pm = make_plugin_manager()\n"
            "assert all(pm.has_plugin(n) for n in BUILTIN_PLUGINS)\n"
            "print('importlib.metadata' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_an_installed_plugin_is_found_and_a_removed_one_is_not(jam_bin, jam_root, tmp_path):
    site = tmp_path / "site"
    dist = add_dist(site, "hello")
    assert "hello" in plugin_names(run(jam_bin, str(site), "plugins", "--json", cwd=jam_root.path))
    add_dist(site, "later")  # installed after a first run: found on the next
    names = plugin_names(run(jam_bin, str(site), "plugins", "--json", cwd=jam_root.path))
    assert {"hello", "later"} <= names
    shutil.rmtree(dist)  # uninstalled (the module itself may linger): no longer loaded
    names = plugin_names(run(jam_bin, str(site), "plugins", "--json", cwd=jam_root.path))
    assert "hello" not in names and "later" in names


@pytest.mark.parametrize("text", [
    "[jam]\n{name} = {mod}\n",
    "[console_scripts]\ntool = {mod}:main\n\n[jam]\n{name} = {mod}\n",
    "  [jam]  \r\n{name} = {mod}\r\n",
    "[[jam]]\n{name} = {mod}\n",
    "\ufeff[jam]\n{name} = {mod}\n",
])
def test_the_quick_look_misses_no_group_importlib_metadata_reads(tmp_path, monkeypatch, text):
    """Whatever importlib.metadata reads as a ``jam`` entry point, the quick look keeps that
    distribution (it may keep more: loading one for nothing costs only time)."""
    site = tmp_path / "site"
    dist = add_dist(site, "spelt", entry_points=text.format(name="spelt", mod="jam_spelt"))
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    theirs = [ep for ep in importlib.metadata.PathDistribution(dist).entry_points if ep.group == "jam"]
    ours = manager.jam_distribution_paths()
    assert ours is not None
    assert (str(dist) in ours) >= bool(theirs)
    if theirs:
        pm = manager.make_plugin_manager()
        assert pm.has_plugin("spelt")


def test_other_groups_only_are_not_loaded(tmp_path, monkeypatch):
    site = tmp_path / "site"
    add_dist(site, "other", entry_points="[console_scripts]\njam = jam_other:main\n[jamboree]\nx = jam_other\n")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    assert manager.jam_distribution_paths() == []


def test_a_fifo_as_entry_points_never_hangs_and_the_rest_load(jam_bin, jam_root, tmp_path):
    site = tmp_path / "site"
    dist = add_dist(site, "trap")
    (dist / "entry_points.txt").unlink()
    os.mkfifo(dist / "entry_points.txt")  # nobody ever writes into it
    add_dist(site, "fine")
    out = run(jam_bin, str(site), "plugins", "--json", cwd=jam_root.path, timeout=30)
    names = plugin_names(out)
    assert "fine" in names and "trap" not in names


def test_a_plugin_inside_a_zip_on_sys_path_is_found(jam_bin, jam_root, tmp_path):
    """importlib.metadata reads distributions inside a zip on sys.path: so does jam."""
    zpath = tmp_path / "plugins.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("jam_zipped/__init__.py", QUIET)
        z.writestr("jam_zipped-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: jam_zipped\nVersion: 0.1\n")
        z.writestr("jam_zipped-0.1.dist-info/entry_points.txt", "[jam]\nzipped = jam_zipped\n")
    assert "zipped" in plugin_names(run(jam_bin, str(zpath), "plugins", "--json", cwd=jam_root.path))


def test_a_finder_that_lists_distributions_itself_is_asked(tmp_path, monkeypatch):
    """A meta-path finder with its own ``find_distributions`` (not the standard PathFinder)
    may list a distribution no sys.path directory holds: importlib.metadata is asked."""
    site, hidden = tmp_path / "site", tmp_path / "hidden"
    add_dist(site, "elsewhere")
    dist = hidden / "jam_elsewhere-0.1.dist-info"
    hidden.mkdir()
    (site / "jam_elsewhere-0.1.dist-info").rename(dist)  # the module importable, its metadata not on sys.path

    class Finder:
        @staticmethod
        def find_spec(*args, **kwargs):
            return None

        @staticmethod
        def find_distributions(context=None):
            return [importlib.metadata.PathDistribution(dist)]

    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Finder])
    assert manager.jam_distribution_paths() is None
    assert manager.make_plugin_manager().has_plugin("elsewhere")


def test_an_unnamed_third_party_select_still_answers_the_dry_run(jam_bin, jam_root, tmp_path):
    """A plugin implementing ``select`` without any ``[policy.NAME]`` table nominates in the
    dry-run of a root whose config names only built-ins: discovery cannot be skipped there."""
    (jam_root.path / "a.txt").write_bytes(b"x" * (1 << 20))
    jam_root.update_config(lambda c: c.setdefault("policy", {}).__setitem__("age", {"older_than": "3650d"}))
    site = tmp_path / "site"
    add_dist(site, "greedy", NOMINATE_ALL)
    out = run(jam_bin, str(site), "stash", "--auto", "--dry-run", cwd=jam_root.path)
    assert out.returncode == 0, out.stderr
    assert "a.txt  (greedy: greedy wants it)" in out.stdout


def test_plan_lines_read_as_one_format_per_file():
    """The plan's lines, made with sizes and reasons formatted once each, read exactly as
    one format per file: a file with two reasons never borrows the text of one with the
    first alone, equal sizes share their text, an unprintable path is escaped."""
    from jam_core.cli.auto import plan_lines
    from jam_core.cli.common import human, show_path
    from jam_core.policy.plan import PlanItem

    a, b = ("age", "last used 2025-01-01, older than 30 days"), ("lru", "among the least recently used 75% by bytes")
    items = [PlanItem("one", 10, 1.0, [a]), PlanItem("two", 10, 1.0, [a, b]), PlanItem("three", 2_500_000, 1.0, [b]),
             PlanItem("bad\nname\udcff", 7, 1.0, [a, b]), PlanItem("four", 10, 1.0, [b, a]), PlanItem("five", 3, 1.0, [a])]
    expected = [f"{human(i.size):>10}  {show_path(i.path)}  ({'; '.join(f'{p}: {r}' for p, r in i.reasons)})"
                for i in items]
    assert plan_lines(items) == expected
    assert "\n" not in "".join(plan_lines(items))


from tests.test_speed_scans import _tree, shared  # noqa: E402,F401  (the forced helper, a tree of stubs)


def _inventory_view(inv):
    c = inv.candidates
    return (sorted(zip(c.paths, c.sizes, c.mtimes, c.atimes, c.lasts, strict=True)), sorted(inv.stubs.items()),
            sorted(inv.kept.items()), sorted(inv.problems), inv.local_bytes)


def test_the_helpers_packed_findings_are_what_one_walk_finds(jam_root, runner, shared):
    """What the helper sends back as blobs (paths joined, numbers as arrays) unpacks into the
    same candidates, clean stubs (their FileRecords), kept files with their reasons and local
    bytes as one walk finds: an undecodable name, a pinned, a small and a hard-linked file,
    stubs and a use recorded by jam in the helper's share included."""
    from jam_core.catalog import Catalog
    from jam_core.policy.pins import add_pins
    from jam_core.policy.records import inventory
    from jam_core.root import CATALOG

    _tree(jam_root, runner)
    for k in range(6):
        d = jam_root.path / f"d{k}"
        (d / os.fsdecode(b"caf\xe9-\xff.txt")).write_bytes(b"x" * (100 + k))
        (d / "small.txt").write_bytes(b"")
        os.link(d / "f0.txt", d / "f0-link.txt")
    add_pins(jam_root, ["d2/f2.txt", "d3"])
    with Catalog(jam_root.jam_dir / CATALOG) as cat:
        with cat.transaction():
            cat.record_use(["d4/f1.txt"], 2_000_000_000.5)
    shared(False)
    alone = _inventory_view(inventory(jam_root))
    shared(True)
    both = _inventory_view(inventory(jam_root))
    assert len(shared.walkers()) == 2, "a helper walked part of the root"
    assert both == alone
    cands, stubs, kept, _, _ = both
    assert any(p.startswith("d5/caf") for p, *_ in cands) and ("d4/f1.txt" in {p for p, *_ in cands})
    assert dict((p, last) for p, _, _, _, last in cands)["d4/f1.txt"] == 2_000_000_000.5
    assert {"d0/s.bin", "d1/s.bin", "d2/s.bin", "d4/s.bin"} <= {p for p, _ in stubs} and "d3/s.bin" not in dict(stubs)
    kept = dict(kept)
    assert kept["d2/f2.txt"] == "pinned" and kept["d3/f1.txt"] == "pinned"
    assert kept["d5/small.txt"] == "smaller than core.min_size" and kept["d1/f0-link.txt"] == "hard-linked"


def test_the_collector_never_walks_the_plan_of_a_dry_run(jam_root, monkeypatch):
    """While the dry-run's plan lives, the cyclic collector does not run: the plan (an object
    per file, no cycle) is printed and freed first, not walked."""
    import gc
    import weakref

    from jam_core.cli import auto
    from jam_core.policy import plan as plan_mod

    jam_root.update_config(lambda c: c.setdefault("policy", {}).__setitem__("age", {"older_than": "1d"}))
    jam_root.update_config(lambda c: c.setdefault("core", {}).__setitem__("min_size", "1"))
    old = 1_000_000_000
    for i in range(1500):
        p = jam_root.path / f"d{i % 3}" / f"f{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * (i + 1))
        os.utime(p, (old, old))
    state = {"on": False, "runs": 0}

    def counting(phase, info):
        if phase == "start" and state["on"]:
            state["runs"] += 1

    real = plan_mod.plan_auto

    def planned(*a, **kw):
        gc.collect()  # nothing left to collect: any run from here is the plan's doing
        state["on"] = True  # from here until the plan is freed
        out = real(*a, **kw)
        weakref.finalize(out, state.__setitem__, "on", False)
        return out

    monkeypatch.setattr(plan_mod, "plan_auto", planned)
    gc.callbacks.append(counting)
    try:
        assert auto.stash_auto_command(dry_run=True) == 0
    finally:
        state["on"] = False
        gc.callbacks.remove(counting)
    assert state["runs"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_lru_and_budget_choose_on_the_lists_what_they_choose_on_records(seed):
    """jam_lru and jam_budget read the core's lists (paths, last-used times, sizes) and make
    no record: they nominate exactly what they nominate from FileRecords, ties included
    (equal last-used times, equal sizes: the order by path decides)."""
    import random

    from jam_budget import select_budget
    from jam_core.model import FileRecord
    from jam_core.policy.records import Candidates, Records
    from jam_lru import select_lru

    rnd = random.Random(seed)
    recs = [FileRecord(f"d{rnd.randrange(5)}/f{i:04d}", rnd.choice([1, 10, 10, 500, 4096]), 0.0, 0.0,
                       float(rnd.randrange(40)), "local", False, 1) for i in range(400)]
    rnd.shuffle(recs)  # the core's lists come in no particular order
    stubs = tuple(FileRecord(f"s{i}", 100, 0.0, 0.0, 1.0, "stub", False, 1) for i in range(30))
    plain = sorted(recs, key=lambda r: r.path)
    lists = Records(candidates=Candidates(recs))
    lists.stubs = stubs
    local = sum(r.size for r in recs)
    for keep in (0.1, 0.5, 0.9):
        for by in ("bytes", "count"):
            assert select_lru(lists, keep, by, stubs) == select_lru(plain, keep, by, stubs)
    for max_local, low in ((local // 2, local // 3), (local - 1, local // 2), (local, local)):
        assert select_budget(lists, local, max_local, low) == select_budget(plain, local, max_local, low)
    assert lists._items is None, "no FileRecord was made"

"""Snapshots of the TUI at 80x24 (pytest-textual-snapshot): the main screen, the tiers view and
the help. Deterministic content: a root at a fixed path, fixed sizes and seeds, fixed mtimes
and atimes, free space fixed. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_file
from tests.safety_support import make_tree

BASE = Path("/tmp/jam-tui-snapshot")
T = 1_699_963_200 * 10**9  # 2023-11-14 12:00 UTC: the same date in every time zone within 11 h


@pytest.fixture
def fixed_root(monkeypatch):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops import browse
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir()
    t = make_tree(BASE)
    for name, size, seed in (("photos/2019/a.jpg", 2_400_000, 1), ("photos/2019/b.jpg", 1_800_000, 2),
                             ("photos/2023/c.jpg", 900_000, 3), ("notes.txt", 12_000, 4),
                             ("video.mkv", 5_000_000, 5), ("src/main.py", 70_000, 6)):
        make_file(t.root / name, size, seed)
        os.utime(t.root / name, ns=(T, T))
    root = Root.find(t.root)
    stash(root, ["photos/2019", "video.mkv"], make_plugin_manager())
    for p in sorted(t.root.rglob("*"), reverse=True):
        if ".jam" not in p.parts:
            os.utime(p, ns=(T, T), follow_symlinks=False)
    os.utime(t.root, ns=(T, T))
    real = browse.summary

    def fixed_free(root, totals=None):
        s = real(root, totals)
        s.free = 50 * 10**9
        return s

    monkeypatch.setattr(browse, "summary", fixed_free)
    monkeypatch.chdir(t.root)
    yield root
    shutil.rmtree(BASE, ignore_errors=True)


def _app(root):
    from jam_core.manager import make_plugin_manager
    from jam_core.tui.app import make_app

    return make_app(root, ".", make_plugin_manager())


async def _settle(pilot) -> None:
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def test_main_screen(fixed_root, snap_compare):
    assert snap_compare(_app(fixed_root), terminal_size=(80, 24), run_before=_settle)


def test_main_screen_inside_a_directory_sorted_by_size(fixed_root, snap_compare):
    async def before(pilot):
        await _settle(pilot)
        await pilot.press("enter")  # photos/ (directories first)
        await _settle(pilot)
        await pilot.press("2")
        await _settle(pilot)

    assert snap_compare(_app(fixed_root), terminal_size=(80, 24), run_before=before)


def test_tiers_view(fixed_root, snap_compare):
    async def before(pilot):
        await _settle(pilot)
        await pilot.press("t")
        await _settle(pilot)

    assert snap_compare(_app(fixed_root), terminal_size=(80, 24), run_before=before)


def test_help(fixed_root, snap_compare):
    async def before(pilot):
        await _settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(_app(fixed_root), terminal_size=(80, 24), run_before=before)

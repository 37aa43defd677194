"""The TUI's speed guards (issue 11, performance half), each on real files: the first screen is
one scandir with stubs trusted by the catalog's stamps (no xattr read), directory rows get
their stubs from one catalog query, the root's scan starts only once the listing is on screen
and never holds it back, a re-sort posts nothing, the help and tiers screens are made once."""

from __future__ import annotations

import os
import threading

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.ops import browse
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import make_tree
from tests.test_tui import SIZE, app_for, listing, run, settle


@pytest.fixture
def root(tmp_path):
    t = make_tree(tmp_path)
    for rel, size, seed in (("s1.bin", 90_000, 1), ("s2.bin", 95_000, 2), ("here.txt", 70_000, 3),
                            ("d/e/deep.bin", 100_000, 4), ("d/side.bin", 120_000, 5), ("d/keep.txt", 10_000, 6),
                            ("g/one.bin", 130_000, 7)):
        make_file(t.root / rel, size, seed)
    r = Root.find(t.root)
    assert len(stash(r, ["s1.bin", "s2.bin", "d/e", "d/side.bin", "g"], make_plugin_manager()).done) == 5
    return r


def _count_xattr_reads(monkeypatch) -> list:
    import jam_core.scan as scan

    seen: list = []
    real = scan.getxattr

    def counting(path, *a, **k):
        seen.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(scan, "getxattr", counting)
    return seen


def test_entries_trust_untouched_stubs_by_stamp_without_reading_xattrs(root, monkeypatch):
    seen = _count_xattr_reads(monkeypatch)
    rows = {r.name: r for r in browse.entries(root)}
    assert seen == []  # two stubs here, both as jam made them: not one xattr read
    assert rows["s1.bin"].state == "stub" and rows["s1.bin"].size == 90_000 and rows["s1.bin"].local == 0
    assert rows["s1.bin"].oid.startswith("b3:") and rows["s1.bin"].remotes == ("vault",)
    assert rows["here.txt"].state == "local"


def test_a_stub_touched_since_its_stamp_is_read_again(root, monkeypatch):
    from jam_core.stub import read_record

    os.chmod(root.path / "s2.bin", 0o444)  # same mode, new ctime: the stamp no longer matches
    seen = _count_xattr_reads(monkeypatch)
    rows = {r.name: r for r in browse.entries(root)}
    assert [os.path.basename(p) for p in seen] == ["s2.bin"]
    assert rows["s2.bin"].state == "stub" and rows["s2.bin"].oid == read_record(str(root.path / "s2.bin")).oid


def test_a_stub_written_into_is_dirty_even_with_a_catalog_row(root):
    p = root.path / "s1.bin"
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"mine")
    rows = {r.name: r for r in browse.entries(root)}
    assert rows["s1.bin"].state == "dirty"


def test_catalog_totals_count_the_stubs_below_each_child_in_one_query(root):
    known = browse.catalog_totals(root)
    assert known == {"d": (2, 220_000), "g": (1, 130_000)}
    assert browse.catalog_totals(root, "d") == {"e": (1, 100_000)}
    assert browse.catalog_totals(root, "g") == {}
    rows = browse.entries(root)
    browse.apply_catalog_totals(rows, known)
    d = next(r for r in rows if r.name == "d")
    assert d.stubs_known and d.stubs == 2 and d.stub_bytes == 220_000 and not d.totals


def test_catalog_totals_of_a_damaged_catalog_are_empty_not_a_crash(root):
    (root.jam_dir / "catalog.db").write_bytes(b"not a database" * 100)
    assert browse.catalog_totals(root) == {}
    assert {r.name for r in browse.entries(root)} >= {"s1.bin", "d"}


@pytest.fixture
def tree_app(root, monkeypatch):
    monkeypatch.chdir(root.path)

    class T:
        jroot = root
    return T


def test_the_listing_shows_while_the_root_scan_is_held(tree_app, monkeypatch):
    """The scan of the whole root is blocked at its start: the directory is still listed, each
    file with its state and size, each directory with the stubs the catalog knows; once the scan
    goes on, the totals follow."""
    import jam_core.tui.screens.main as main

    release, started = threading.Event(), threading.Event()
    real = main.status

    def held(root, rel="."):
        started.set()
        assert release.wait(30)
        return real(root, rel)

    monkeypatch.setattr(main, "status", held)

    async def go():
        app = app_for(tree_app)
        async with app.run_test(size=SIZE) as pilot:
            for _ in range(200):  # bounded: a first screen that waits for the scan never comes
                await pilot.pause()
                lst = listing(pilot)
                d = next((r for r in lst.rows if r.name == "d"), None)
                if started.is_set() and d is not None and d.stubs_known:
                    break
            else:
                release.set()
                raise AssertionError("the listing waited for the root's scan")
            rows = {r.name: r for r in lst.rows}
            assert rows["s1.bin"].state == "stub" and rows["here.txt"].state == "local"
            assert not rows["d"].totals and rows["d"].stubs == 2
            assert "…f 2s" in lst.row_text(rows["d"], 80)
            assert app.screen.totals is None
            release.set()
            await settle(pilot)
            assert rows["d"].totals and rows["d"].files == 3 and app.screen.totals is not None
            await pilot.press("q")
    run(go())


def test_the_root_scan_starts_only_once_the_listing_is_shown(tree_app, monkeypatch):
    import jam_core.tui.screens.main as main

    shown_when_scanned: list = []
    real = main.status
    app_ref: list = []

    def watching(root, rel="."):
        lst = app_ref[0].screen.query_one(main.Listing)
        shown_when_scanned.append(bool(lst.rows))
        return real(root, rel)

    monkeypatch.setattr(main, "status", watching)

    async def go():
        app = app_for(tree_app)
        app_ref.append(app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("r")
            await settle(pilot)
            await pilot.press("q")
    run(go())
    assert shown_when_scanned == [True, True]


def test_a_resort_or_size_toggle_posts_no_marks_or_cursor_message(tree_app):
    from jam_core.tui.messages import Highlighted, MarksChanged

    async def go():
        app = app_for(tree_app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            lst = listing(pilot)
            posted: list = []
            real = lst.post_message
            lst.post_message = lambda m: (posted.append(type(m)), real(m))[1]
            await pilot.press("2", "a", "o", "1")
            await pilot.pause()
            assert MarksChanged not in posted and Highlighted not in posted, posted
            await pilot.press("space")
            assert MarksChanged in posted and Highlighted in posted
            await pilot.press("q")
    run(go())


def test_help_and_tiers_are_made_once_and_shown_again(tree_app):
    async def go():
        app = app_for(tree_app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            screens = []
            for _ in range(2):
                await pilot.press("question_mark")
                await pilot.pause()
                screens.append(app.screen)
                await pilot.press("escape")
                await pilot.press("t")
                await settle(pilot)
                screens.append(app.screen)
                await pilot.press("escape")
                await pilot.pause()
            assert screens[0] is screens[2] and screens[1] is screens[3] and screens[0] is not screens[1]
            assert type(screens[0]).__name__ == "HelpScreen" and type(screens[1]).__name__ == "TiersScreen"
            assert listing(pilot) is not None
            await pilot.press("q")
    run(go())


def test_the_keys_line_names_every_shown_key_and_never_recomposes(tree_app):
    from jam_core.tui.widgets.keys_bar import KeysBar

    async def go():
        app = app_for(tree_app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            bar = app.screen.query_one(KeysBar)
            text = str(bar.render())
            for word in ("Fetch", "Stash", "Pin", "Doctor", "Filter", "Info", "Tiers", "Mark", "Help", "Quit"):
                assert word in text
            await pilot.press("slash", "s", "enter")  # the focus moves to the box and back
            await pilot.pause()
            assert app.screen.query_one(KeysBar) is bar and not bar.children
            await pilot.press("q")
    run(go())

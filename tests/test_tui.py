"""`jam tui` driven with Pilot at 80x24 on a real root whose stubs live on a real dir remote
(real xattrs). Assertions are on the files on disk: is it a stub now, is it pinned."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path

import pytest

from jam_core import hookimpl
from tests.conftest import make_file
from tests.safety_support import make_tree

SIZE = (80, 24)


def is_stub(path: Path) -> bool:
    try:
        os.getxattr(path, "user.jam", follow_symlinks=False)
        return True
    except OSError:
        return False


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """root/ with a.bin, b.bin (stubs), c.txt (local), d/ (two local files); dir remote 'vault'."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    t = make_tree(tmp_path)
    data = {}
    for name, size, seed in (("a.bin", 100_000, 1), ("b.bin", 150_000, 2), ("c.txt", 70_000, 3),
                             ("d/x.bin", 80_000, 4), ("d/y.bin", 90_000, 5)):
        data[name] = make_file(t.root / name, size, seed)
    root = Root.find(t.root)
    res = stash(root, ["a.bin", "b.bin"], make_plugin_manager())
    assert len(res.done) == 2
    monkeypatch.chdir(t.root)
    t.data = data
    t.jroot = root
    return t


def app_for(tree, *plugins, rel="."):
    from jam_core.manager import make_plugin_manager
    from jam_core.tui.app import make_app

    return make_app(tree.jroot, rel, make_plugin_manager(extra=plugins))


async def settle(pilot) -> None:
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def listing(pilot):
    from jam_core.tui.widgets.listing import Listing

    return pilot.app.screen.query_one(Listing)


async def goto(pilot, name: str) -> None:
    """Put the cursor on ``name`` the way a user would: the filter, then Enter."""
    await pilot.press("slash", *name, "enter")
    await settle(pilot)
    assert listing(pilot).current.name == name


def run(coro):
    asyncio.run(coro)


def test_fetch_a_single_stub_at_once(tree):
    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "a.bin")
            await pilot.press("f")
            await settle(pilot)
            await pilot.press("q")
        assert app.return_code == 0
    run(go())
    assert not is_stub(tree.root / "a.bin")
    assert (tree.root / "a.bin").read_bytes() == tree.data["a.bin"]
    assert is_stub(tree.root / "b.bin")


def test_stash_a_single_file_at_once(tree):
    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "c.txt")
            await pilot.press("s")
            await settle(pilot)
            assert any("stashed 1 files" in t for _, t in app.notices), app.notices
    run(go())
    assert is_stub(tree.root / "c.txt")


def test_a_directory_asks_first_n_cancels_y_confirms(tree):
    from jam_core.tui.screens.confirm import ConfirmScreen

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "d")
            await pilot.press("s")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            await settle(pilot)
            assert not is_stub(tree.root / "d/x.bin") and not is_stub(tree.root / "d/y.bin")
            await pilot.press("s")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await settle(pilot)
    run(go())
    assert is_stub(tree.root / "d/x.bin") and is_stub(tree.root / "d/y.bin")


def test_marks_show_count_and_bytes_escape_cancels_enter_confirms(tree):
    from textual.widgets import Label

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "a.bin")
            await pilot.press("space")  # marks a.bin
            await pilot.press("escape")  # clears the filter
            await goto(pilot, "b.bin")
            await pilot.press("space")
            marks = str(app.screen.query_one("#marks", Label).render())
            assert "2 marked (250.0 KB)" in marks, marks
            await pilot.press("f")
            await pilot.pause()
            await pilot.press("escape")  # the confirmation: nothing happens
            await settle(pilot)
            assert is_stub(tree.root / "a.bin") and is_stub(tree.root / "b.bin")
            await pilot.press("f", "enter")
            await settle(pilot)
    run(go())
    assert not is_stub(tree.root / "a.bin") and not is_stub(tree.root / "b.bin")
    assert (tree.root / "b.bin").read_bytes() == tree.data["b.bin"]


def test_pin_fetches_then_unpin(tree):
    from jam_core.policy.pins import read_pins

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "b.bin")
            await pilot.press("p")
            await settle(pilot)
            assert read_pins(tree.jroot) == {"b.bin"}
            assert not is_stub(tree.root / "b.bin")  # pinning a stub brings it back, as `jam pin` does
            assert listing(pilot).current.pinned
            await pilot.press("p")
            await settle(pilot)
            assert read_pins(tree.jroot) == set()
    run(go())


def test_filter_narrows_enter_keeps_escape_clears(tree):
    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            every = [r.name for r in listing(pilot).view]
            assert sorted(every) == ["a.bin", "b.bin", "c.txt", "d"]
            await pilot.press("slash", "b", "i", "n")
            await pilot.pause()
            assert [r.name for r in listing(pilot).view] == ["a.bin", "b.bin"]
            await pilot.press("enter")
            await pilot.pause()
            assert listing(pilot).has_focus and listing(pilot).cursor == 0
            assert [r.name for r in listing(pilot).view] == ["a.bin", "b.bin"]  # Enter keeps it
            await pilot.press("escape")
            await pilot.pause()
            assert sorted(r.name for r in listing(pilot).view) == sorted(every)
            await pilot.press("slash", "x", "escape")  # Escape in the box clears it too
            await pilot.pause()
            assert sorted(r.name for r in listing(pilot).view) == sorted(every)
    run(go())


def test_open_and_up_and_directory_totals(tree):
    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            d = next(r for r in listing(pilot).view if r.name == "d")
            assert (d.files, d.stubs, d.size, d.state) == (2, 0, 170_000, "local")
            await goto(pilot, "d")
            await pilot.press("enter")
            await settle(pilot)
            assert sorted(r.name for r in listing(pilot).view) == ["x.bin", "y.bin"]
            await pilot.press("left")
            await settle(pilot)
            assert listing(pilot).current.name == "d"  # back up, on the directory we came from
    run(go())


class Gate:
    """A plugin whose fetch of one object blocks until the test lets it go (the dir backend
    then does the real work): a transfer made slow deterministically."""

    def __init__(self, oid: str):
        self.oid = oid
        self.started = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def fetch(self, oid):
        if oid == self.oid:
            self.started.set()
            self.release.wait(30)
        return None


class StashGate(Gate):
    """Blocks every store on a remote until the test lets it go."""

    @hookimpl
    def stash(self, oid):
        self.started.set()
        self.release.wait(30)
        return None

    fetch = None


def test_escape_mid_transfer_cancels_and_what_finished_stays(tree):
    from jam_core.stub import read_record

    gate = Gate(read_record(str(tree.root / "b.bin")).oid)

    async def go():
        app = app_for(tree, gate)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "a.bin")
            await pilot.press("space", "escape")
            await goto(pilot, "b.bin")
            await pilot.press("space", "f", "y")
            assert await asyncio.to_thread(gate.started.wait, 30)  # b.bin's fetch is in flight
            assert app.screen.query_one("#status").has_class("-busy")  # the progress bar shows
            await pilot.press("escape")
            gate.release.set()
            await settle(pilot)
            assert any("cancelled" in t for _, t in app.notices), app.notices
            await pilot.press("q")
        assert app.return_code == 0
    try:
        run(go())
    finally:
        gate.release.set()
    assert not is_stub(tree.root / "a.bin")  # finished before Escape: stays fetched
    assert is_stub(tree.root / "b.bin")  # cancelled: still the stub, no temporary left beside it
    assert sorted(p.name for p in tree.root.iterdir()) == [".jam", "a.bin", "b.bin", "c.txt", "d"]


def test_escape_mid_stash_leaves_the_file(tree):
    gate = StashGate("")

    async def go():
        app = app_for(tree, gate)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "c.txt")
            await pilot.press("s")
            assert await asyncio.to_thread(gate.started.wait, 30)
            await pilot.press("escape")
            gate.release.set()
            await settle(pilot)
            assert any("cancelled" in t for _, t in app.notices), app.notices
    try:
        run(go())
    finally:
        gate.release.set()
    assert not is_stub(tree.root / "c.txt")
    assert (tree.root / "c.txt").read_bytes() == tree.data["c.txt"]


def test_a_remote_that_is_down_is_a_notification_not_a_crash(tree):
    os.rename(tree.remote, str(tree.remote) + ".unplugged")

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "a.bin")
            await pilot.press("f")
            await settle(pilot)
            errors = [t for sev, t in app.notices if sev == "error"]
            assert errors and "vault" in errors[0], app.notices
            await pilot.press("t")
            await settle(pilot)
            from textual.widgets import DataTable

            table = app.screen.query_one(DataTable)
            assert table.get_cell("vault", "reachable") == "NO"
            await pilot.press("escape", "q")
        assert app.return_code == 0
    run(go())
    assert is_stub(tree.root / "a.bin")


def test_tiers_view_lists_remotes_with_holdings(tree):
    from textual.widgets import DataTable

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("t")
            await settle(pilot)
            table = app.screen.query_one(DataTable)
            assert str(table.get_cell("vault", "kind")) == "dir"
            assert table.get_cell("vault", "tier") == "0"
            assert table.get_cell("vault", "reachable") == "yes"
            assert table.get_cell("vault", "objects") == "2"
            assert table.get_cell("vault", "bytes") == "250.0 KB"
            await pilot.press("escape")
            await pilot.pause()
            assert listing(pilot) is not None
    run(go())


def test_info_pane_shows_stub_metadata_and_remotes(tree):
    from jam_core.stub import read_record
    from jam_core.tui.widgets.info_pane import InfoPane

    oid = read_record(str(tree.root / "a.bin")).oid

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "a.bin")
            await pilot.press("i")
            await settle(pilot)
            text = str(app.screen.query_one(InfoPane).render())
            assert oid[:20] in text and "vault" in text and "stashed" in text and "0644" in text, text
    run(go())


def test_sort_keys_and_size_toggle(tree):
    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("2")  # by size, biggest first
            assert [r.name for r in listing(pilot).view] == ["d", "b.bin", "a.bin", "c.txt"]
            await pilot.press("3")  # by local bytes: the stubs hold none here
            assert [r.name for r in listing(pilot).view][:2] == ["d", "c.txt"]
            await pilot.press("a")
            assert "disk" in listing(pilot).header_text(80)
    run(go())


def test_doctor_reports_a_stub_written_into(tree):
    p = tree.root / "a.bin"
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(50_000)
        f.write(b"user data")

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await goto(pilot, "a.bin")
            assert listing(pilot).current.state == "dirty"
            await pilot.press("d")
            await settle(pilot)
            assert any(sev == "warning" and "dirty" in t for sev, t in app.notices), app.notices
    run(go())


def test_hostile_names_and_a_broken_stub_are_rows_not_crashes(tree):
    (tree.root / "d" / "new\nline").write_bytes(b"x")
    os.symlink("/etc", tree.root / "link")
    os.setxattr(tree.root / "b.bin", "user.jam", b"garbage")
    bad = os.fsdecode(b"\xff\xfe.bin")
    (tree.root / bad).write_bytes(b"y")

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            rows = {r.name: r for r in listing(pilot).view}
            assert rows["b.bin"].state == "bad" and rows["link"].kind == "link"
            text = listing(pilot).row_text(rows[bad], 80)
            assert "\\xff" in text
            await goto(pilot, "link")
            await pilot.press("enter", "s")  # a symlink is neither opened nor stashed
            await settle(pilot)
            assert os.path.islink(tree.root / "link")
    run(go())


def test_cli_outside_a_root_is_one_line_exit_2(tmp_path, jam_bin):
    res = subprocess.run([jam_bin, "tui"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("jam: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = subprocess.run([jam_bin, "tui", "nowhere"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("jam: ")


def test_bare_jam_piped_prints_help(tree, jam_bin):
    res = subprocess.run([jam_bin], cwd=tree.root, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and "Usage: jam" in res.stdout


def test_cli_import_does_not_load_textual():
    import sys

    code = "import sys, jam_core.cli, jam_core.cli.tui; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_names_that_look_like_markup_are_shown_as_text(tree):
    """A directory named like Rich markup is a name: in the path bar, the confirmation and the
    info pane it is shown as it is, never parsed (a parse error would crash the app)."""
    from jam_core.tui.screens.confirm import ConfirmScreen
    from jam_core.tui.widgets.path_bar import PathBar

    weird = "[bold]x[i]"  # names cannot hold "/", so no closing tag: parsed, it would show as "x"
    make_file(tree.root / weird / "in.bin", 70_000, 9)

    async def go():
        app = app_for(tree)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("slash", "x", "left_square_bracket", "enter")
            await settle(pilot)
            assert listing(pilot).current.name == weird
            await pilot.press("i")
            await settle(pilot)
            await pilot.press("s")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await settle(pilot)
            await pilot.press("enter")
            await settle(pilot)
            assert weird in str(app.screen.query_one(PathBar).render())
            assert weird in app.screen.query_one(PathBar).render().plain
            await pilot.press("q")
        assert app.return_code == 0
    run(go())
    assert is_stub(tree.root / weird / "in.bin")

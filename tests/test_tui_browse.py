"""jam_core.ops.browse, the library side of the TUI, on real files: one directory's rows, the
totals of each child folded from one status scan, details of a stub, holdings per remote."""

from __future__ import annotations

import os

import pytest

from jam_core.fs import ThroughSymlink, tmp_name
from jam_core.manager import make_plugin_manager
from jam_core.ops import browse
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import make_tree


@pytest.fixture
def root(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "top.bin", 90_000, 1)
    make_file(t.root / "d/e/deep.bin", 100_000, 2)
    make_file(t.root / "d/e/f/deeper.bin", 110_000, 3)
    make_file(t.root / "d/side.bin", 120_000, 4)
    (t.root / "empty").mkdir()
    r = Root.find(t.root)
    assert len(stash(r, ["d/e"], make_plugin_manager()).done) == 2
    return r


def test_child_totals_fold_every_level_below(root):
    rows = {r.name: r for r in browse.entries(root)}
    totals = browse.dir_totals(root)
    browse.apply_totals(list(rows.values()), totals)
    d = rows["d"]
    assert (d.files, d.stubs, d.size, d.local, d.state) == (3, 2, 330_000, 120_000, "partly")
    assert rows["empty"].state == "empty" and rows["empty"].files == 0
    assert totals.here.files == 1 and totals.total.files == 4
    sub = browse.dir_totals(root, "d")
    assert set(sub.children) == {"e"} and sub.children["e"].stubs == 2 and sub.here.files == 1


def test_entries_leave_out_jam_dir_and_jam_temporaries_and_show_symlinks(root):
    (root.path / tmp_name()).write_bytes(b"half written")
    os.symlink("/etc", root.path / "etc-link")
    names = {r.name: r for r in browse.entries(root)}
    assert ".jam" not in names
    assert not any(n.startswith(".jam-") for n in names)
    assert names["etc-link"].kind == browse.LINK
    stubs = {r.name: r for r in browse.entries(root, "d/e")}
    assert stubs["deep.bin"].state == "stub" and stubs["deep.bin"].remotes == ("vault",)
    assert stubs["deep.bin"].size == 100_000 and stubs["deep.bin"].local == 0


def test_a_symlinked_directory_is_never_listed_through(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    os.symlink(outside, root.path / "d" / "out")
    with pytest.raises(ThroughSymlink):
        browse.entries(root, "d/out")
    with pytest.raises(ThroughSymlink):
        browse.details(root, "d/out/secret")


def test_details_of_a_stub(root):
    d = browse.details(root, "d/e/deep.bin")
    assert d.state == "stub" and d.size == 100_000 and d.mode == 0o644
    assert d.oid.startswith("b3:") and d.remotes == ("vault",) and d.stashed_at
    assert d.pins == ()
    from jam_core.policy.pins import pin

    pin(root, ["d"])
    assert browse.details(root, "d/e/deep.bin").pins == ("d",)
    assert browse.details(root, "d/e").kind == browse.DIR


def test_holdings_count_objects_of_this_roots_stubs(root):
    h = browse.holdings(root)
    assert h["vault"].objects == 2 and h["vault"].bytes == 210_000


def test_summary(root):
    s = browse.summary(root)
    assert (s.local_bytes, s.stashed_bytes, s.stubs, s.files) == (210_000, 210_000, 2, 4)
    assert s.free > 0

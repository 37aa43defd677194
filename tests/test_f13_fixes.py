"""Fixes of this round's reviews (R15, R16) that their own tests do not reach on their own:
jam's files in ``.jam`` planted as symlinks are never opened through the link, from any
command, and doctor --fix rebuilds a catalog that is one."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from tests.conftest import make_file
from tests.safety_support import jam, make_tree


@pytest.fixture
def tree(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "d" / "f.bin", 80_000, seed=41)
    jam("stash", "d", cwd=t.root)
    return t


@pytest.mark.parametrize("side", ["", "-wal"])
def test_a_symlinked_catalog_is_never_opened_and_doctor_rebuilds_it(tree, tmp_path, side):
    """`.jam/catalog.db` (or its -wal) a symlink to another program's database: `jam status`
    says so in one line (exit 1) and writes nothing there; `jam doctor --fix` moves the link
    aside and rebuilds the catalog from the tree (the stub is known again).
    Guard (mutation-checked): catalog.not_regular in Catalog.__init__."""
    other = tmp_path / "someone-elses.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE bookmarks (url TEXT)")
    db.commit()
    db.close()
    before = other.read_bytes()
    cat = tree.root / ".jam" / f"catalog.db{side}"
    if cat.exists():
        cat.unlink()
    cat.symlink_to(other)
    res = jam("status", cwd=tree.root, check=1)
    assert "not a regular file" in res.err and len(res.err.strip().splitlines()) == 1, res.err
    assert other.read_bytes() == before
    out = json.loads(jam("doctor", "--fix", "--json", cwd=tree.root, check=None).out)
    assert any(c["kind"] == "catalog" and c["fixed"] for c in out["problems"]), out
    assert other.read_bytes() == before
    assert not (tree.root / ".jam" / "catalog.db").is_symlink()
    assert b"d/f.bin" in {r[0] for r in sqlite3.connect(tree.root / ".jam" / "catalog.db").execute(
        "SELECT path FROM stubs")}


def test_a_symlinked_lock_is_refused_and_creates_nothing(tree, tmp_path):
    """`.jam/lock` a symlink to a path outside: every writer refuses it in one line and creates
    nothing where it points. Guard (mutation-checked): O_NOFOLLOW in Root.lock."""
    target = tmp_path / "outside" / "made-by-jam"
    target.parent.mkdir()
    lock = tree.root / ".jam" / "lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    res = jam("checkout", "d", cwd=tree.root, check=None)
    assert res.returncode != 0 and "symlink" in res.err, res.err
    assert not target.exists()
    os.unlink(lock)
    jam("checkout", "d", cwd=tree.root)


def test_a_checkout_of_a_few_files_sets_their_marks_without_reading_every_row(tmp_path, monkeypatch):
    """The cd index after a checkout of one file of a root with stubs in several directories:
    only the marks that file can move are set again (one indexed query each), never a read of
    every catalog row (a million-stub root paid seconds per cd); the marks are those a whole
    rebuild makes. Guard (mutation-checked): hook.index._refresh_some."""
    from jam_core.catalog import Catalog
    from jam_core.hook.index import index_path, refresh
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.checkout import checkout
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    t = make_tree(tmp_path)
    for rel in ("a/x", "a/y", "b/z", "b/é/w", "c/v"):
        make_file(t.root / rel, 70_000, seed=len(rel))
    root = Root(t.root)
    assert len(stash(root, ["a", "b", "c"], make_plugin_manager()).done) == 5

    def marks():
        out = set()
        for d, _dirs, _files in os.walk(index_path(root)):
            if os.stat(d).st_mode & 0o1000:
                out.add(os.path.relpath(d, index_path(root)))
        return out

    assert marks() == {"a", "b", "b/é", "c"}
    monkeypatch.setattr(Catalog, "stubs", lambda self: pytest.fail("every row read for a checkout of a few files"))
    assert sorted(r for r, _ in checkout(root, ["a/x", "c/v", "b/é/w"], make_plugin_manager()).done) == [
        "a/x", "b/é/w", "c/v"]
    assert marks() == {"a", "b"}
    assert not (t.root / ".jam" / "stubdirs" / "c").exists()  # a leaf fetched whole goes
    monkeypatch.undo()
    with Catalog(t.root / ".jam" / "catalog.db") as cat:
        refresh(root, cat)  # the whole rebuild agrees
    assert marks() == {"a", "b"}


def test_a_run_killed_before_its_index_refresh_is_caught_up_by_the_next_one(tmp_path):
    """A stash killed after its swaps and catalog rows, before its refresh: the cd index lacks
    `a`'s mark, and `.jam/stubdirs.stale` (hook.index.begin) is left. The next run, a stash of
    another directory only, rebuilds the whole index: `a` is marked again (a run that changes
    a few files would otherwise set only their marks). Guard (mutation-checked): the ``behind``
    of ops/stash.py (index.begin's answer)."""
    from jam_core.hook.index import STALE, index_path
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    t = make_tree(tmp_path)
    make_file(t.root / "a" / "x", 70_000, seed=1)
    make_file(t.root / "b" / "y", 70_000, seed=2)
    root = Root(t.root)
    assert len(stash(root, ["a"], make_plugin_manager()).done) == 1
    mark = os.path.join(index_path(root), "a")
    os.chmod(mark, 0o755)  # what the killed run's refresh never got to set
    (t.root / ".jam" / STALE).touch()
    assert len(stash(root, ["b"], make_plugin_manager()).done) == 1
    assert os.stat(mark).st_mode & 0o1000, "a's stubs are never fetched on cd"
    assert not (t.root / ".jam" / STALE).exists()

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

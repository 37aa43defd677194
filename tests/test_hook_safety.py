"""The cd hooks and their index never write outside jam's own directories (issue 8, items 9, 10).

Hostile metadata is planted on real files: rows with ``../`` in the real SQLite catalog,
symlinks in ROOT/.jam/stubdirs and ROOT/.jam/visits, a visits directory that is a symlink or
has the wrong owner or mode. The hooks run in the real shells (bash --norc, zsh -f,
fish --no-config) as in test_shell_hooks.py, synchronised on prompt markers.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_file
from tests.test_shell_hooks import SHELLS, Shell, env, is_stub, jam_exe, logged, tree  # noqa: F401

pexpect = pytest.importorskip("pexpect")


def snapshot(top: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """``{path: (mode, size)}`` of everything under ``top`` except ``skip`` (lstat)."""
    out = {}
    for dirpath, dirnames, files in os.walk(top):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for n in dirnames + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size)
    return out


def add_rows(root, paths: list[str]) -> None:
    db = sqlite3.connect(root.jam_dir / "catalog.db")
    with db:
        for p in paths:
            db.execute("INSERT OR REPLACE INTO stubs VALUES (?,?,?,?,?)",
                       (os.fsencode(p), "b3:" + "0" * 64, 1000, 0, "2026-01-01T00:00:00"))
    db.close()


HOSTILE_ROWS = ["../../outside/x", "../../../escaped/y", "../../plain/z", "/abs/olute/w", ".jam/tmp/v",
                "data/../../../up/u", "a//b", "./c", "nul\0byte/t"]


@pytest.mark.parametrize("how", ["refresh", "jam-stash"])
def test_catalog_rows_with_dotdot_write_nothing_outside_the_index(tree, tmp_path, jam_exe, env, how):
    """Item 9: a catalog row with ``../`` made the index create and chmod directories outside .jam."""
    from jam_core.stubdirs import refresh

    root, _ = tree
    make_file(root.path / "more/new.bin", 100_000, seed=5)
    add_rows(root, HOSTILE_ROWS)
    before = snapshot(tmp_path, root.jam_dir)
    if how == "refresh":
        refresh(root)
    else:
        out = subprocess.run([jam_exe, "stash", str(root.path / "more")], cwd=root.path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
    after = snapshot(tmp_path, root.jam_dir)
    changed = {p: (before.get(p), after.get(p)) for p in set(before) | set(after) if before.get(p) != after.get(p)}
    if how == "jam-stash":  # the file stashed, nothing else
        changed.pop(str(root.path / "more/new.bin"), None)
    assert changed == {}
    for p in [tmp_path / "outside", tmp_path / "escaped", root.path / "outside", Path("/abs/olute"), tmp_path / "up"]:
        assert not p.exists()
    assert not stat.S_IMODE(os.lstat(root.path / "plain").st_mode) & stat.S_ISVTX
    # The index itself is right: the good stubs' directories are marked, nothing else.
    idx = root.jam_dir / "stubdirs"
    marked = sorted(str(p.relative_to(idx)) for p in [idx, *idx.rglob("*")] if os.lstat(p).st_mode & stat.S_ISVTX)
    assert marked == (["data", "data/deep"] if how == "refresh" else ["data", "data/deep", "more"])


def test_valid_rel():
    from jam_core.stubdirs import valid_rel

    for good in ["a", "a/b", "a b/c\nd", "x\udcff", ".jamx/y", "a/.jam/b"]:
        assert valid_rel(good), good
    for bad in HOSTILE_ROWS + ["", "..", ".", ".jam", "/", "a/", "a/./b", None, b"a"]:
        assert not valid_rel(bad), bad


@pytest.mark.parametrize("where", ["needed-dir", "leaf", "unneeded", "the-index-itself"])
def test_symlink_planted_in_the_index_is_never_followed(tree, tmp_path, where):
    """A symlink in .jam/stubdirs pointing outside: refresh neither chmods nor creates through it."""
    from jam_core.stubdirs import refresh

    root, _ = tree
    idx = root.jam_dir / "stubdirs"
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep/file").write_text("keep me\n")
    outside.chmod(0o700)
    link = {"needed-dir": idx / "data", "leaf": idx / "data/deep", "unneeded": idx / "nothing-here",
            "the-index-itself": idx}[where]
    if link.is_dir() and not link.is_symlink():
        import shutil

        shutil.rmtree(link)
    link.symlink_to(outside)
    before = snapshot(tmp_path, root.jam_dir)
    before[str(outside)] = os.lstat(outside).st_mode
    refresh(root)
    after = snapshot(tmp_path, root.jam_dir)
    after[str(outside)] = os.lstat(outside).st_mode
    assert after == before
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep/file").read_text() == "keep me\n"
    assert not link.is_symlink()  # replaced by a real directory, or removed
    assert (idx / "data").is_dir() and not (idx / "data").is_symlink()
    assert os.lstat(idx / "data").st_mode & stat.S_ISVTX


def test_a_symlinked_index_ancestor_in_a_mark_check_is_not_written(tree, tmp_path):
    """A file planted in the index where a directory must go is replaced, not written into."""
    from jam_core.stubdirs import refresh

    root, _ = tree
    idx = root.jam_dir / "stubdirs"
    import shutil

    shutil.rmtree(idx / "data")
    (idx / "data").write_text("junk")
    refresh(root)
    assert (idx / "data/deep").is_dir() and os.lstat(idx / "data/deep").st_mode & stat.S_ISVTX

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
from tests.test_shell_hooks import SHELLS, Shell, env, is_stub, jam_exe, logged, marks, shell, tree  # noqa: F401

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
            db.execute("INSERT OR REPLACE INTO stubs (path, oid, size, mtime_ns, stashed_at) VALUES (?,?,?,?,?)",
                       (os.fsencode(p), "b3:" + "0" * 64, 1000, 0, "2026-01-01T00:00:00"))
    db.close()


HOSTILE_ROWS = ["../../outside/x", "../../../escaped/y", "../../plain/z", "/abs/olute/w", ".jam/tmp/v",
                "data/../../../up/u", "a//b", "./c", "nul\0byte/t"]


@pytest.mark.parametrize("how", ["refresh", "jam-stash"])
def test_catalog_rows_with_dotdot_write_nothing_outside_the_index(tree, tmp_path, jam_exe, env, how):
    """Item 9: a catalog row with ``../`` made the index create and chmod directories outside .jam."""
    from jam_core.hook.index import refresh

    root, _ = tree
    make_file(root.path / "more/new.bin", 100_000, seed=5)
    absolute = f"{tmp_path}/abs/olute/w"  # under tmp_path: a failing run must not litter /
    add_rows(root, [r for r in HOSTILE_ROWS if not r.startswith("/")] + [absolute])
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
    for p in [tmp_path / "outside", tmp_path / "escaped", root.path / "outside", tmp_path / "abs", tmp_path / "up"]:
        assert not p.exists()
    assert not stat.S_IMODE(os.lstat(root.path / "plain").st_mode) & stat.S_ISVTX
    # The index itself is right: the good stubs' directories are marked, nothing else.
    idx = root.jam_dir / "stubdirs"
    marked = sorted(str(p.relative_to(idx)) for p in [idx, *idx.rglob("*")] if os.lstat(p).st_mode & stat.S_ISVTX)
    assert marked == (["data", "data/deep"] if how == "refresh" else ["data", "data/deep", "more"])


def test_valid_rel():
    from jam_core.root import valid_rel

    for good in ["a", "a/b", "a b/c\nd", "x\udcff", ".jamx/y", "a/.jam/b"]:
        assert valid_rel(good), good
    for bad in HOSTILE_ROWS + ["", "..", ".", ".jam", "/", "a/", "a/./b", None, b"a"]:
        assert not valid_rel(bad), bad


@pytest.mark.parametrize("where", ["needed-dir", "leaf", "unneeded", "the-index-itself"])
def test_symlink_planted_in_the_index_is_never_followed(tree, tmp_path, where):
    """A symlink in .jam/stubdirs pointing outside: refresh neither chmods nor creates through it."""
    from jam_core.hook.index import refresh

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
    from jam_core.hook.index import refresh

    root, _ = tree
    idx = root.jam_dir / "stubdirs"
    import shutil

    shutil.rmtree(idx / "data")
    (idx / "data").write_text("junk")
    refresh(root)
    assert (idx / "data/deep").is_dir() and os.lstat(idx / "data/deep").st_mode & stat.S_ISVTX


# -- item 10: the cd hooks never write through a symlink ------------------------------------


def _cd(shell, path: Path) -> str:
    return shell.run(f"cd {shlex.quote(str(path))}")


def test_a_symlinked_mark_is_never_written_through(shell, tree, logged, tmp_path):
    """A symlink named like a directory's mark, pointing at a file outside: one cd emptied it."""
    from jam_core.hook.marks import encode

    root, _ = tree
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    d = os.fsencode(root.jam_dir / "visits")
    for rel in ["plain", ".", "nostubs/sub"]:
        os.symlink(victim, os.path.join(d, encode(rel)))
    os.symlink(tmp_path / "dangling", os.path.join(d, encode("nostubs")))  # would create a file outside
    out = _cd(shell, root.path / "plain") + _cd(shell, root.path) + _cd(shell, root.path / "nostubs/sub")
    out += _cd(shell, root.path / "nostubs")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "dangling").exists()
    assert "jam:" not in out and "arning" not in out, out
    assert all(os.path.islink(os.path.join(d, n)) for n in os.listdir(d))  # nothing replaced them
    (root.path / "plain/fresh").mkdir()
    _cd(shell, root.path / "plain/fresh")  # a mark that is no symlink is still written
    assert "plain/fresh" in marks(root)


def test_a_fifo_mark_does_not_hang_the_shell(shell, tree, logged):
    from jam_core.hook.marks import encode

    root, _ = tree
    os.mkfifo(os.path.join(os.fsencode(root.jam_dir / "visits"), encode("plain")))
    shell.p.timeout = 15
    out = _cd(shell, root.path / "plain") + shell.run("echo still-here")
    assert "still-here" in out


def test_a_symlinked_visits_dir_is_not_written_into(shell, tree, logged, tmp_path):
    """ROOT/.jam/visits itself a symlink to a directory elsewhere: nothing is created or emptied there."""
    from jam_core.hook.marks import encode

    root, _ = tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / encode("plain").decode()).write_text("precious\n")
    d = root.jam_dir / "visits"
    d.rmdir()
    d.symlink_to(elsewhere)
    _cd(shell, root.path / "plain")
    _cd(shell, root.path / "nostubs")
    assert sorted(os.listdir(elsewhere)) == [encode("plain").decode()]
    assert (elsewhere / encode("plain").decode()).read_text() == "precious\n"


def test_a_visits_dir_owned_by_someone_else_is_not_written_into(shell, tree, logged):
    root, _ = tree
    d = root.jam_dir / "visits"
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    os.chown(d, 65534, 65534)
    d.chmod(0o777)  # writable by us too: only the owner check stops the write
    _cd(shell, root.path / "plain")
    assert os.listdir(d) == []


@pytest.mark.parametrize("kind", ["zsh"])
def test_a_visits_dir_writable_by_others_is_not_written_into(kind, tree, logged, jam_exe, env, tmp_path):
    """zsh reads the mode without a process (glob qualifiers); bash and fish cannot (see README)."""
    root, _ = tree
    d = root.jam_dir / "visits"
    d.chmod(0o777)
    sh = Shell(kind, jam_exe, logged[0], tmp_path, env)
    try:
        _cd(sh, root.path / "plain")
        assert os.listdir(d) == []
        d.chmod(0o700)
        _cd(sh, root.path / "nostubs")
        assert marks(root) == {"nostubs"}
    finally:
        sh.close()


# -- the Python side of the marks: folding never follows a symlink, checks the owner ---------


def _plant_outside(tmp_path: Path) -> Path:
    from jam_core.hook.marks import encode

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for rel in ["plain", "data", "."]:
        (elsewhere / encode(rel).decode()).write_text("precious\n")
    return elsewhere


@pytest.mark.parametrize("which", ["visits", "visits.folding"])
def test_fold_never_moves_or_removes_through_a_symlinked_dir(tree, tmp_path, capsys, which):
    """visits (or the folding dir) a symlink to a directory elsewhere: its files stay there."""
    from jam_core.catalog import Catalog
    from jam_core.hook import marks as visitmarks
    from jam_core.hook.marks import encode, fold

    root, _ = tree
    elsewhere = _plant_outside(tmp_path)
    before = sorted(os.listdir(elsewhere))
    if which == "visits":
        (root.jam_dir / "visits").rmdir()
    else:
        (root.jam_dir / "visits" / encode("nostubs").decode()).touch()
    (root.jam_dir / which).symlink_to(elsewhere)
    visitmarks._warned.clear()  # a fresh process as far as warnings go
    fold(root)
    fold(root)
    assert sorted(os.listdir(elsewhere)) == before
    assert all((elsewhere / n).read_text() == "precious\n" for n in before)
    with Catalog(root.jam_dir / "catalog.db") as cat:
        assert not any(p.startswith("plain/") for p in cat.uses())
    err = capsys.readouterr().err
    assert err.count("jam: ") == 1 and "not a directory" in err, err  # said once


@pytest.mark.parametrize("how", ["owner", "mode"])
def test_a_visits_dir_with_the_wrong_owner_or_mode_is_ignored_with_one_warning(tree, capsys, how):
    from jam_core.catalog import Catalog
    from jam_core.hook import marks as visitmarks
    from jam_core.hook.marks import encode, fold

    root, _ = tree
    d = root.jam_dir / "visits"
    (d / encode("plain").decode()).touch()
    if how == "owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory to another user")
        os.chown(d, 65534, 65534)
    else:
        d.chmod(0o775)
    visitmarks._warned.clear()
    assert fold(root) == 0
    assert fold(root) == 0
    assert os.listdir(d) == [encode("plain").decode()]  # left alone
    with Catalog(root.jam_dir / "catalog.db") as cat:
        assert "plain/local.bin" not in cat.uses()
    err = capsys.readouterr().err
    assert err.count("jam: ") == 1, err
    assert ("uid 65534" if how == "owner" else "mode 775") in err
    if how == "owner":
        os.chown(d, os.geteuid(), os.getegid())
    d.chmod(0o700)
    assert fold(root) == 1  # fixed: the mark counts


def test_jam_makes_its_visits_dir_0700(tree):
    from jam_core.hook.marks import ensure

    root, _ = tree
    d = root.jam_dir / "visits"
    d.rmdir()
    old = os.umask(0)
    try:
        ensure(root)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700


def test_a_directory_swapped_for_a_symlink_mid_plan_is_not_followed(tree, tmp_path, monkeypatch):
    """hook-fetch's plan: a subdirectory listed as a directory, then replaced by a symlink to
    a directory outside before it is opened: nothing outside is planned (or fetched into)."""
    import jam_core.hook.visit as visit
    from jam_core.hook.settings import HookSettings

    root, _ = tree
    outside = tmp_path / "outside"
    make_file(outside / "secret.bin", 1000, seed=1)
    sub = root.path / "plain/sub"
    make_file(sub / "inner.bin", 1000, seed=2)
    make_file(root.path / "plain/z.bin", 1000, seed=3)  # classified after sub was listed
    real = visit.classify
    swapped = []

    def classify(path, st, *a, **kw):
        if not swapped and str(path).endswith("z.bin"):
            os.rename(sub, root.path / "plain/sub.moved")
            os.symlink(outside, sub)
            swapped.append(1)
        return real(path, st, *a, **kw)

    monkeypatch.setattr(visit, "classify", classify)
    p = visit.plan(root, "plain", HookSettings(depth=1))
    assert swapped
    assert not any(f.startswith("plain/sub/") for f in p.files), p.files
    assert "plain/z.bin" in p.files and "plain/local.bin" in p.files


def test_hook_fetch_ignores_catalog_rows_outside_the_root(tree, tmp_path, jam_exe, env):
    """heal() leaves the visited scope's stale rows out of the index (they stay in the catalog:
    only doctor, which proves a stub gone, forgets one); a row with ../ is neither looked at
    nor followed."""
    root, _ = tree
    (root.path / "plain/new").mkdir()
    add_rows(root, ["plain/new/gone.bin", "plain/new/../../../outside/x"])
    with open(root.config_path, "a") as f:
        f.write('\n[hook]\ndepth = "all"\n')
    from jam_core.hook.index import refresh

    refresh(root)
    out = subprocess.run([jam_exe, "hook-fetch", str(root.path / "plain/new")], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    db = sqlite3.connect(root.jam_dir / "catalog.db")
    rows = {os.fsdecode(r[0]) for r in db.execute("SELECT path FROM stubs")}
    db.close()
    assert {"plain/new/gone.bin", "plain/new/../../../outside/x"} <= rows  # left for doctor
    mirror = root.jam_dir / "stubdirs" / "plain" / "new"
    assert not (mirror.exists() and mirror.stat().st_mode & 0o1000), "a cd here still starts jam"  # healed
    assert not (tmp_path / "outside").exists()

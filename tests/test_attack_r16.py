"""Review R16 (an attacker's): the cd hook's fast path (shell/jam.*, jam_core/cli/hook.py,
jam_core/cli/hook_server.py, jam_core/hook/) against what `jam checkout` checks.

Each test injects one hostile condition on real files and real shells (bash --norc, zsh -f,
fish --no-config running the printed hook), or calls the hook's entry point
(``jam_core.cli.hook.run_hook_fetch``) where the shell does not matter. A test marked
xfail(strict=True) is a hole found by this review (its reason says which); the others pass
thanks to the guard their docstring names.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_file, require_tool

SHELLS = ["bash", "zsh", "fish"]
FLAGS = {"bash": ["--norc", "--noprofile", "-c"], "zsh": ["-f", "-c"], "fish": ["--no-config", "-c"]}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _env() -> dict:
    env = dict(os.environ, JAM_DISABLE="", JAM_BACKGROUND="0", JAM_HOOK_SERVER="0")
    env.pop("PROMPT_COMMAND", None)
    env.pop("PYTHONPATH", None)
    return env


def _jam(jam_bin: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([jam_bin, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def _cd(shell: str, jam_bin: str, where: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """A real ``shell`` sources `jam hook SHELL` and cds into ``where`` (bash: then runs its
    PROMPT_COMMAND, as a prompt would)."""
    exe = require_tool(shell)
    text = subprocess.run([jam_bin, "hook", shell], env=_env(), capture_output=True, text=True, check=True).stdout
    hook = tmp_path / f"hook.{shell}"
    hook.write_text(text)
    after = "; _jam_hook" if shell == "bash" else ""
    script = f"source {str(hook)!r}; cd {str(where)!r}{after}"
    return subprocess.run([exe, *FLAGS[shell], script], env=_env(), capture_output=True, text=True, timeout=120)


def _is_stub(path: Path) -> bool:
    try:
        os.getxattr(path, "user.jam", follow_symlinks=False)
    except OSError:
        return False
    return True


def _stash(root, rels: list[str], seed: int = 0) -> dict[str, str]:
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    content = {rel: _digest(make_file(root.path / rel, 70_000 + i, seed=seed + i)) for i, rel in enumerate(rels)}
    assert len(stash(root, sorted({r.split("/")[0] for r in rels}), make_plugin_manager()).done) == len(rels)
    return content


# -- 1. nested roots: the shells take the first root of the list, not the nearest ------------------


@pytest.mark.xfail(strict=True, reason="BUG: the shell hooks take the first listed root that contains $PWD, "
                   "not the nearest: a root moved inside another and re-registered is never fetched on cd")
@pytest.mark.parametrize("shell", SHELLS)
def test_a_root_moved_inside_another_still_fetches_on_cd(shell, tmp_path, jam_bin):
    """The README's way back for a moved root: `mv` it, `jam init .` in it (put back on the roots
    list). Inside another root, the list then holds the outer root first; the hooks pick it,
    look at ITS index (which never lists a nested root's stubs) and start nothing: the inner
    root's stubs stay stubs on every cd. `jam hook-fetch` there (find_root: the nearest) fetches them."""
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    outer.mkdir()
    inner.mkdir()
    assert _jam(jam_bin, "init", ".", cwd=outer).returncode == 0
    assert _jam(jam_bin, "init", ".", cwd=inner).returncode == 0
    make_file(inner / "d/big.bin", 70_000, seed=1)
    assert _jam(jam_bin, "stash", "d", cwd=inner).returncode == 0
    os.rename(inner, outer / "inner")
    res = _jam(jam_bin, "init", ".", cwd=outer / "inner")
    assert res.returncode == 0, res.stderr
    assert _is_stub(outer / "inner/d/big.bin")
    res = _cd(shell, jam_bin, outer / "inner/d", tmp_path)
    assert res.returncode == 0, res.stderr
    assert not _is_stub(outer / "inner/d/big.bin"), "the cd fetched nothing: " + res.stderr


# -- 2. ROOT/.jam entries the hook's fetch opens through a symlink -------------------------------


@pytest.fixture
def stubbed(jam_root):
    content = _stash(jam_root, ["data/f0", "data/f1"])
    return jam_root, content


def _hook_fetch(directory: Path) -> int:
    from jam_core.cli.hook import run_hook_fetch

    return run_hook_fetch(str(directory))


@pytest.mark.xfail(strict=True, reason="BUG: Root.lock opens .jam/lock with O_CREAT through a symlink: a cd "
                   "creates a file wherever a planted .jam/lock points (outside the root)")
def test_a_symlinked_lock_creates_nothing_outside_the_root(stubbed, tmp_path):
    """Invariant 7/10: nothing is written outside a root or a remote; ROOT/.jam is input (the
    hooks already refuse a symlinked .jam/visits and replace a symlinked .jam/stubdirs). A
    `.jam/lock` planted as a symlink to a path outside: the cd hook's fetch (its fold, its
    checkout) creates that file (as root: /etc/nologin would lock every other user out)."""
    root, content = stubbed
    target = tmp_path / "outside" / "created-by-jam"
    target.parent.mkdir()
    lock = root.jam_dir / "lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    assert _hook_fetch(root.path / "data") == 0
    assert not target.exists(), "a cd created a file outside the root through .jam/lock"


@pytest.mark.xfail(strict=True, reason="BUG: the catalog is opened with sqlite3.connect(path), following a "
                   "symlinked .jam/catalog.db: a cd writes jam's tables into another program's database")
def test_a_symlinked_catalog_writes_nothing_into_another_database(stubbed, tmp_path):
    """`.jam/catalog.db` planted as a symlink to another program's SQLite database (a browser's
    history, say): the cd hook's fetch opens it, switches it to WAL and creates jam's tables in
    it. Nothing outside the root may be written; the catalog can be rebuilt from the tree."""
    root, _ = stubbed
    other = tmp_path / "someone-elses.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE bookmarks (url TEXT)")
    db.commit()
    db.close()
    before = other.read_bytes()
    (root.jam_dir / "catalog.db").unlink()
    (root.jam_dir / "catalog.db").symlink_to(other)
    _hook_fetch(root.path / "data")
    db = sqlite3.connect(other)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert tables == {"bookmarks"} and other.read_bytes() == before, f"written into: {sorted(tables)}"

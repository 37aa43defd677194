"""Shared fixtures: every test gets its own HOME and XDG dirs, so nothing leaks between tests
or into the developer's real data dir."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """The path of an external tool; a missing tool fails in CI (CI=true) and skips elsewhere."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but is not installed (.ci/run must install it)")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("JAM_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("JAM_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("JAM_DEBUG", raising=False)
    monkeypatch.setenv("JAM_HOOK_SERVER_IDLE", "120")  # the hooks' warm servers leave soon after the tests
    return home


@pytest.fixture
def jam_bin() -> str:
    """The installed `jam` console script of this interpreter's environment."""
    path = Path(sys.executable).parent / "jam"
    assert path.exists(), "install the project first: pip install -e '.[test]'"
    return str(path)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def jam_root(tmp_path, monkeypatch):
    """An initialised root with the embedded default remote; the cwd is the root."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import ensure_default_remote
    from jam_core.root import Root

    path = tmp_path / "root"
    path.mkdir()
    root, _ = Root.init(path)
    ensure_default_remote(root, make_plugin_manager())
    monkeypatch.chdir(path)
    return root


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    """A file of ``size`` pseudo-random bytes (deterministic per seed). Returns its bytes."""
    import random

    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


from tests.conftest_seaweed import *  # noqa: E402,F401,F403  (SeaweedFS fixtures for the rclone tests)
from tests.conftest_sshd import *  # noqa: E402,F401,F403  (sshd fixtures for the sftp tests)

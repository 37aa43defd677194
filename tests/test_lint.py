"""ruff's rules (pyproject.toml) over every Python file of the repository. (shellcheck over the
bash hook is tests/test_shell_hooks.py::test_shellcheck_bash_hook.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    cmd = [str(ruff)] if ruff.exists() else [require_tool("ruff")]
    res = subprocess.run([*cmd, "check", "--no-cache", "jam_core", "plugins", "tests", "bench"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

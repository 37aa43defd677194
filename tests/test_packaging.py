"""A clean `pip install .` (not editable) must carry every module of jam: a package missing from
pyproject's list works in the editable development install and is absent for a user."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_and_shell_file(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools would reuse a stale build/ of the working tree
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                               ".pytest_cache", ".ruff_cache"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(REPO)) for p in (REPO / "jam_core").rglob("*.py")}
    for plugin in (REPO / "plugins").iterdir():
        if (plugin / "__init__.py").exists():
            want |= {str(p.relative_to(REPO / "plugins")) for p in plugin.rglob("*.py")}
    want |= {f"jam_core/shell/{n}" for n in ("jam.bash", "jam.zsh", "jam.fish")}
    want.add("jam_core/tui/jam.tcss")
    missing = sorted(n for n in want if n not in names and "__pycache__" not in n)
    assert not missing, f"not in the wheel (add the package to pyproject's packages): {missing}"

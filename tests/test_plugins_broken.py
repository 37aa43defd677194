"""Third-party plugins that are broken never stop jam: skipped with one warning line, listed as
broken by `jam plugins`, and a hook that raises at call time is one line naming the plugin.

Each plugin is a real distribution (a dist-info with an entry point in the `jam` group) on
PYTHONPATH, and the real `jam` console script runs in a subprocess, as a user would meet it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_file

PLUGINS = {
    # name: module source
    "boom_import": "raise RuntimeError('this plugin cannot start\\nsecond line')\n",
    "missing_dep": "import jam_no_such_module_anywhere\n",
    "bad_arg": ("from jam_core import hookimpl\n\n@hookimpl\n"
                "def select(records, purpose, colour):\n    return None\n"),
    "typo_hook": ("from jam_core import hookimpl\n\n@hookimpl\n"
                  "def selcet(records):\n    return None\n"),
    "exits": "import sys\nsys.exit(3)\n",
}
REASONS = {
    "boom_import": "RuntimeError: this plugin cannot start second line",
    "missing_dep": "ModuleNotFoundError",
    "bad_arg": "colour",
    "typo_hook": "unknown hook 'selcet'",
    "exits": "SystemExit: 3",
}


def add_dist(site: Path, name: str, source: str, version: str = "0.1") -> None:
    mod = f"jam_{name}"
    (site / mod).mkdir(parents=True)
    (site / mod / "__init__.py").write_text(source)
    dist = site / f"{mod}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(f"[jam]\n{name} = {mod}\n")


@pytest.fixture
def site(tmp_path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    return site


def run(jam_bin, site, *args, cwd=None, **env):
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    full = dict(os.environ, PYTHONPATH=path, **env)
    return subprocess.run([jam_bin, *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=60)


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_a_broken_plugin_is_skipped_with_one_line_and_listed(jam_bin, site, jam_root, name):
    add_dist(site, name, PLUGINS[name])
    add_dist(site, "fine", "from jam_core import hookimpl\n\n@hookimpl\ndef select(records):\n    return None\n")
    out = run(jam_bin, site, "plugins", "--json", cwd=jam_root.path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = warnings(out.stderr)
    assert line.startswith(f"jam: plugin {name} skipped: ")
    assert REASONS[name] in line and f"JAM_BLOCK_PLUGINS={name}" in line
    info = {p["name"]: p for p in json.loads(out.stdout)}
    assert REASONS[name] in info[name]["broken"] and info[name]["hooks"] == []
    assert info["fine"]["broken"] is None and info["fine"]["hooks"] == ["select"]  # the rest load
    assert info["jam_dir"]["broken"] is None

    human = run(jam_bin, site, "plugins", cwd=jam_root.path)
    assert human.returncode == 0
    assert any(line.startswith(f"{name} 0.1 (entry point): BROKEN") for line in human.stdout.splitlines())

    # any other command carries on, with its own exit code
    make_file(jam_root.path / "a.bin", 100_000)
    out = run(jam_bin, site, "stash", "a.bin", cwd=jam_root.path)
    assert out.returncode == 0 and "stashed 1 file" in out.stdout
    assert len(warnings(out.stderr)) == 1 and "Traceback" not in out.stderr
    out = run(jam_bin, site, "status", "nope", cwd=jam_root.path)
    assert out.returncode == 2 and "Traceback" not in out.stderr

    # blocked as the warning says: silence
    out = run(jam_bin, site, "plugins", "--json", cwd=jam_root.path, JAM_BLOCK_PLUGINS=name)
    assert out.returncode == 0 and out.stderr == ""
    assert name not in {p["name"] for p in json.loads(out.stdout)}


def test_a_hook_that_raises_is_one_line_naming_the_plugin(jam_bin, site, jam_root):
    add_dist(site, "picky", ("from jam_core import hookimpl\n\n@hookimpl\n"
                             "def select(records, purpose):\n"
                             "    raise ValueError('cannot decide today')\n"))
    make_file(jam_root.path / "a.bin", 100_000)
    (jam_root.config_path).write_text(jam_root.config_path.read_text() + '\n[policy.age]\nolder_than = "30d"\n')
    out = run(jam_bin, site, "stash", "--auto", cwd=jam_root.path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    (line,) = warnings(out.stderr)
    assert line == ("jam: plugin picky failed in select: ValueError: cannot decide today "
                    "(block it with JAM_BLOCK_PLUGINS=picky)")
    out = run(jam_bin, site, "stash", "--auto", cwd=jam_root.path, JAM_BLOCK_PLUGINS="picky")
    assert out.returncode == 0, out.stderr


def test_programs_own_plugins_still_fail_loudly():
    """Only third-party entry points are forgiven: a bad plugin passed in code is a bug."""
    import pluggy

    from jam_core import hookimpl
    from jam_core.manager import make_plugin_manager

    class BadArg:
        @hookimpl
        def select(self, records, colour):
            return None

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(extra=(BadArg(),), load_entrypoints=False)

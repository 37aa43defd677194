"""What `jam --version`, the cd hook's `jam hook-fetch DIR` and `jam status` load: only what
they need.

The hook's path to its first byte must not import click, paramiko, textual or rich, nor scan
every installed distribution for entry points (importlib.metadata) when the built-in dir
backend is all the root needs; a root whose remote or policy comes from a third-party plugin
still gets its plugins. Each test runs the real `jam` console script in a subprocess on real
files and checks both what was imported (``$JAM_DEBUG_MODULES``) and that the bytes are back.
The plain `jam status [--json] [PATH]` starts without click too (a scan people run on large
trees) and must say exactly what the click command says, errors included.
Behaviour only: no timings here (bench/bench_hook.py and bench/bench_core.py measure them).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jam_core import __version__
from tests.conftest import make_file

HEAVY = ("click", "paramiko", "textual", "rich", "importlib.metadata", "jam_sftp", "jam_rclone",
         "jam_age", "jam_lru", "jam_budget", "jam_related",
         # a checkout of one batch runs in the calling thread (ops/pipeline.py: no ThreadPoolExecutor,
         # which imports logging), and the dir backend imports uuid (and with it platform) only
         # where it makes a probe name
         "concurrent.futures", "logging", "platform", "uuid")

# A third-party backend of kind "toy": the dir backend under another kind name, so only a
# plugin manager that loaded the entry point can serve it.
TOY_HOOKS = {
    "check_remote": "remote, create",
    "remote_id": "remote, session, create",
    "has": "remote, oid, size",
    "list_objects": "remote, session, sweep",
    "stash": "remote, oid, source, size, session",
    "sync": "remote, session",
    "hash_object": "remote, oid, size, session",
    "fetch": "remote, oid, dest, size, session",
    "remove": "remote, oid, session",
    "write_meta": "remote, name, data, session",
    "read_meta": "remote, name, session",
    "list_meta": "remote, prefix, session",
    "free_space": "remote, session",
}
TOY = "import dataclasses\n\nimport jam_dir\nfrom jam_core import hookimpl\n\n" + "".join(
    f"\n@hookimpl\ndef {name}({args}):\n"
    f"    if remote.kind != 'toy':\n        return None\n"
    f"    remote = dataclasses.replace(remote, kind='dir')\n"
    f"    return jam_dir.{name}({args})\n"
    for name, args in TOY_HOOKS.items())
POLICY = "from jam_core import hookimpl\n\n@hookimpl\ndef select(records):\n    return None\n"


def add_dist(site: Path, name: str, source: str) -> None:
    """A real distribution on PYTHONPATH with an entry point in jam's group."""
    mod = f"jam_{name}"
    (site / mod).mkdir(parents=True)
    (site / mod / "__init__.py").write_text(source)
    dist = site / f"{mod}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[jam]\n{name} = {mod}\n")


@pytest.fixture
def site(tmp_path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    add_dist(site, "toy", TOY)
    add_dist(site, "toypolicy", POLICY)
    return site


@pytest.fixture
def env(site) -> dict:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    e.pop("JAM_BACKGROUND", None)
    return e


def make_root(tmp_path: Path, kind: str = "dir", policy: str | None = None):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import ensure_default_remote
    from jam_core.root import Root

    path = tmp_path / "root"
    path.mkdir()
    root, _ = Root.init(path)
    ensure_default_remote(root, make_plugin_manager(load_entrypoints=False))

    def change(own: dict) -> None:
        for table in own["remote"].values():
            table["kind"] = kind
        if policy:
            own["policy"] = {policy: {}}

    with root.lock():
        root.update_config(change)
    digests = {}
    for i in range(3):
        data = make_file(path / "d" / f"f{i}", 64 * 1024, seed=i)
        digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return root, digests


def stash(jam_bin: str, env: dict, d: Path) -> None:
    res = subprocess.run([jam_bin, "stash", str(d)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "stashed 3 files" in res.stdout, res.stdout + res.stderr


def hook_fetch(jam_bin: str, env: dict, d: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`jam hook-fetch -- DIR` as the hook runs it; returns the result and the modules it loaded."""
    listing = tmp_path / "modules.txt"
    listing.unlink(missing_ok=True)
    res = subprocess.run([jam_bin, "hook-fetch", "--", str(d)], env=dict(env, JAM_DEBUG_MODULES=str(listing)),
                         capture_output=True, text=True, timeout=120, cwd=str(d))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return res, set(listing.read_text().split())


def back(d: Path, digests: dict) -> bool:
    """Every file holds its bytes again and is no stub any more."""
    return all(hashlib.sha256((d / n).read_bytes()).hexdigest() == h and not _has_xattr(d / n)
               for n, h in digests.items())


def _has_xattr(p: Path) -> bool:
    return "user.jam" in os.listxattr(p, follow_symlinks=False)


def test_hook_fetch_of_dir_remotes_loads_no_click_no_entry_points_and_restores_the_bytes(jam_bin, env, tmp_path):
    root, digests = make_root(tmp_path)
    d = root.path / "d"
    stash(jam_bin, env, d)
    assert all(_has_xattr(d / n) for n in digests)
    res, modules = hook_fetch(jam_bin, env, d, tmp_path)
    assert "fetched 3 files" in res.stderr
    assert back(d, digests), "the hook's fetch did not bring the stubs' bytes back"
    assert "jam_dir" in modules and "jam_core.ops.checkout" in modules  # the same verified checkout
    loaded = sorted(m for m in modules for h in HEAVY if m == h or m.startswith(h + "."))
    assert loaded == [], f"the hook's path imported {loaded}"
    assert "jam_toy" not in modules and "jam_toypolicy" not in modules  # installed, not needed


def test_a_third_party_backend_configured_as_a_remote_still_fetches_from_the_hook(jam_bin, env, tmp_path):
    root, digests = make_root(tmp_path, kind="toy")
    d = root.path / "d"
    stash(jam_bin, env, d)
    assert all(_has_xattr(d / n) for n in digests)
    res, modules = hook_fetch(jam_bin, env, d, tmp_path)
    assert "fetched 3 files" in res.stderr, res.stderr
    assert back(d, digests), "the toy backend's stubs did not come back"
    assert "jam_toy" in modules and "importlib.metadata" in modules  # the full plugin manager
    assert "click" not in modules


def test_a_third_party_policy_in_the_config_loads_the_plugins_on_the_hook(jam_bin, env, tmp_path):
    root, digests = make_root(tmp_path, policy="toypolicy")
    d = root.path / "d"
    stash(jam_bin, env, d)
    res, modules = hook_fetch(jam_bin, env, d, tmp_path)
    assert back(d, digests), res.stderr
    assert "jam_toypolicy" in modules and "jam_toy" in modules


@pytest.mark.parametrize("config, environ, expected", [
    ({"remote": {"a": {"kind": "dir"}, "b": {"kind": "dir"}}}, {}, True),
    ({"remote": {}}, {}, True),
    ({}, {}, True),
    ({"remote": {"a": {"kind": "dir"}}, "policy": {"age": {}, "lru": {}}}, {}, True),
    ({"remote": {"a": {"kind": "dir"}, "b": {"kind": "sftp"}}}, {}, False),
    ({"remote": {"a": {"kind": "toy"}}}, {}, False),
    ({"remote": {"a": {"kind": "dir"}}, "policy": {"toypolicy": {}}}, {}, False),
    ({"remote": {"a": "dir"}}, {}, False),
    ({"remote": ["dir"]}, {}, False),
    ({"remote": {"a": {"kind": "dir"}}, "policy": "age"}, {}, False),
    ({"remote": {"a": {"kind": "dir"}}}, {"JAM_LOAD_PLUGINS": "toy"}, False),
    ({"remote": {"a": {"kind": "dir"}}}, {"JAM_LOAD_PLUGINS": ""}, True),
    ({"remote": {"a": {"kind": "dir"}}}, {"JAM_BLOCK_PLUGINS": "jam_dir"}, False),
])
def test_when_the_dir_backend_alone_suffices(config, environ, expected, monkeypatch):
    from jam_core.manager import dir_suffices, fetch_plugin_manager

    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    assert dir_suffices(config) is expected
    if expected:
        names = {name for name, _ in fetch_plugin_manager(config).list_name_plugin()}
        assert names == {"jam_core.placement", "jam_dir"}


def test_jam_version_imports_no_click_and_says_what_click_said(jam_bin, runner):
    from jam_core.cli import main

    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('click', 'pluggy', 'sqlite3')), file=sys.stderr))\n"
            "sys.argv = ['jam', '--version']\nfrom jam_core.cli import main\nmain()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "[]", res.stderr
    assert res.stdout == f"jam, version {__version__}\n"
    assert runner.invoke(main, ["--version"]).output == res.stdout  # the click group's own answer
    for flag in ("--version", "-V"):
        out = subprocess.run([jam_bin, flag], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout == res.stdout


def test_other_forms_of_hook_fetch_still_go_through_click(jam_bin, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    res = subprocess.run([jam_bin, "hook-fetch", "--", str(a_file)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is a file" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([jam_bin, "hook-fetch", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "DIRECTORY" in res.stdout
    res = subprocess.run([jam_bin, "hook-fetch"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Missing argument" in res.stderr
    res = subprocess.run([jam_bin, "hook-fetch", "--", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == ""  # outside every root: nothing to do, nothing said


def test_an_internal_error_on_the_fast_path_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    import jam_core.cli as cli
    import jam_core.cli.hook as hook

    def broken(directory):
        raise RuntimeError("injected\nfault")

    monkeypatch.setattr(hook, "_hook_fetch", broken)
    assert cli._fast(["hook-fetch", "--", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["jam: internal error: RuntimeError: injected fault "
                                "(run again with JAM_DEBUG=1 to see where)"]
    monkeypatch.setenv("JAM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli._fast(["hook-fetch", "--", str(tmp_path)])


def _status_root(tmp_path: Path, jam_bin: str, env: dict):
    """A root with local files, stubs, a stub written into (a problem on stderr), a pin and a
    directory whose name starts with a dash."""
    root, _ = make_root(tmp_path)
    stash(jam_bin, env, root.path / "d")
    make_file(root.path / "-dash" / "x", 5000)
    make_file(root.path / "e" / "y", 7000)
    os.chmod(root.path / "d" / "f1", 0o644)
    with open(root.path / "d" / "f1", "r+b") as f:
        f.write(b"my edits")
    res = subprocess.run([jam_bin, "pin", "e"], cwd=root.path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return root


@pytest.mark.parametrize("args", [[], ["--json"], [".", "--json"], ["--json", "d"], ["--", "-dash"], ["e"]])
def test_plain_status_imports_no_click_and_says_what_click_said(jam_bin, env, runner, tmp_path, monkeypatch, args):
    from jam_core.cli import main

    root = _status_root(tmp_path, jam_bin, env)
    listing = tmp_path / "modules.txt"
    res = subprocess.run([jam_bin, "status", *args], cwd=root.path, env=dict(env, JAM_DEBUG_MODULES=str(listing)),
                         capture_output=True, text=True, timeout=60)
    assert "click" not in set(listing.read_text().split())
    monkeypatch.chdir(root.path)
    clicked = runner.invoke(main, ["status", *args], catch_exceptions=False, prog_name="jam")
    assert (res.returncode, res.stdout, res.stderr) == (clicked.exit_code, clicked.stdout, clicked.stderr)
    assert res.returncode == 0 and res.stdout
    if "e" not in args and "-dash" not in args:  # the scan covers d: its problem is said (JSON: on stdout)
        assert "f1" in res.stdout + res.stderr and "written into" in res.stdout + res.stderr


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "Usage: jam status"),
    (["a", "b"], 2, "unexpected extra argument"),
    (["--bogus"], 2, "No such option '--bogus'"),
    (["-dash"], 2, "No such option"),
    ([""], 2, "no such file or directory"),
    (["--json", "--json"], 0, '"total"'),
    (["nowhere"], 2, "nowhere: no such file or directory"),
    (["--", "--json"], 2, "--json: no such file or directory"),
])
def test_other_forms_of_status_say_what_click_says(jam_bin, env, runner, tmp_path, monkeypatch, args, code, says):
    from jam_core.cli import main

    root = _status_root(tmp_path, jam_bin, env)
    res = subprocess.run([jam_bin, "status", *args], cwd=root.path, env=env, capture_output=True, text=True,
                         timeout=60)
    monkeypatch.chdir(root.path)
    clicked = runner.invoke(main, ["status", *args], catch_exceptions=False, prog_name="jam")
    assert (res.returncode, res.stdout, res.stderr) == (clicked.exit_code, clicked.stdout, clicked.stderr)
    assert res.returncode == code and says in res.stdout + res.stderr and "Traceback" not in res.stderr


def test_status_outside_a_root_is_one_line_exit_2_on_both_paths(jam_bin, runner, tmp_path, monkeypatch):
    from jam_core.cli import main

    res = subprocess.run([jam_bin, "status", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [f"jam: {tmp_path} is not inside a jam root (run `jam init` in the tree's "
                                       "top directory)"]
    clicked = runner.invoke(main, ["status", str(tmp_path)])
    assert (clicked.exit_code, clicked.stderr) == (2, res.stderr)


@pytest.mark.parametrize("exc, code, says", [
    (KeyError("surprise"), 1, "jam: internal error: KeyError: 'surprise' (run again with JAM_DEBUG=1 to see where)"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "jam: no space left on the local disk; free some space "
     "and run the command again"),
    (OSError(errno.EACCES, "Permission denied", "/r/x"), 1, "jam: /r/x: Permission denied"),
    (KeyboardInterrupt(), 130, "jam: interrupted; nothing was lost (files not yet done are as they were)"),
])
def test_an_error_of_the_plain_status_is_said_as_the_click_group_says_it(runner, tmp_path, monkeypatch, capsys,
                                                                        exc, code, says):
    import jam_core.cli as cli
    import jam_core.ops.status
    from jam_core.cli import main
    from jam_core.root import Root

    def fail(*args, **kwargs):
        raise exc

    top = tmp_path / "root"
    top.mkdir()
    Root.init(top)
    monkeypatch.chdir(top)
    monkeypatch.setattr(jam_core.ops.status, "status", fail)
    assert cli._fast(["status"]) == code
    assert capsys.readouterr().err.splitlines() == [says]
    clicked = runner.invoke(main, ["status"])
    assert (clicked.exit_code, clicked.stderr.splitlines()) == (code, [says])
    if not isinstance(exc, KeyboardInterrupt):
        monkeypatch.setenv("JAM_DEBUG", "1")
        with pytest.raises(type(exc)):
            cli._fast(["status"])


def _uses(root) -> dict[str, float]:
    from jam_core.catalog import Catalog

    with Catalog(root.jam_dir / "catalog.db") as cat:
        return cat.uses()


def test_the_shells_mark_for_this_cd_counts_the_visit_once(jam_bin, env, tmp_path):
    """The mark the shell left for this very cd is folded at arrival; the fetch does not
    record the same visit a second time (one catalog transaction fewer on the hook's path)."""
    from jam_core.hook.marks import encode, ensure

    root, digests = make_root(tmp_path)
    d = root.path / "d"
    (d / "small").write_bytes(b"below core.min_size: stays local")  # in the visit's scope, never fetched
    stash(jam_bin, env, d)
    ensure(root)
    mark = root.jam_dir / "visits" / os.fsdecode(encode("d"))
    mark.touch()
    when = 1_600_000_000.0  # the cd's time, as the shell's mark dates it
    os.utime(mark, (when, when))
    hook_fetch(jam_bin, env, d, tmp_path)
    assert back(d, digests) and not mark.exists()
    uses = _uses(root)
    assert uses.get("d/small") == when, uses  # counted by the fold, at the cd's time, and only there


def test_without_a_mark_the_hooks_fetch_still_counts_the_visit(jam_bin, env, tmp_path):
    import time

    root, digests = make_root(tmp_path)
    d = root.path / "d"
    (d / "small").write_bytes(b"below core.min_size: stays local")
    stash(jam_bin, env, d)
    (root.path / "other").mkdir()
    from jam_core.hook.marks import encode, ensure

    ensure(root)
    other = root.jam_dir / "visits" / os.fsdecode(encode("other"))  # a mark for another directory
    other.touch()
    before = time.time()
    hook_fetch(jam_bin, env, d, tmp_path)
    assert back(d, digests)
    uses = _uses(root)
    assert uses.get("d/small", 0) >= before - 1 and uses.get("other/x") is None, uses


@pytest.mark.parametrize("value", [None, "", "   ", "/tmp/jam-xdg-test", "relative/dir"])
def test_user_dirs_follow_platformdirs_without_importing_it(value, monkeypatch):
    """jam answers the XDG rule itself on Linux (platformdirs costs the hook's fetch 6-20 ms):
    the answer must stay the one platformdirs gives, for set, empty, blank and relative values."""
    import platformdirs

    from jam_core import root

    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert str(root.user_data_dir()) == platformdirs.user_data_dir("jam", appauthor=False)
    assert str(root.user_config_dir()) == platformdirs.user_config_dir("jam", appauthor=False)


def test_the_builtins_register_exactly_the_hooks_of_their_modules():
    """manager._marked hands pluggy only the marked functions (no static inspection of every
    name of a module): the same hooks, specs, implementations and options as the modules."""
    import importlib

    import pluggy

    from jam_core import hookspecs
    from jam_core.manager import BUILTIN_PLUGINS, make_plugin_manager

    def table(pm):
        return sorted((name, tuple((i.plugin_name, i.function, i.tryfirst, i.trylast, i.wrapper, i.hookwrapper)
                                   for i in caller.get_hookimpls()), caller.spec is not None and caller.spec.opts.get("firstresult"))
                      for name, caller in vars(pm.hook).items() if isinstance(caller, pluggy.HookCaller))

    ours = make_plugin_manager(load_entrypoints=False)
    plain = pluggy.PluginManager("jam")
    plain.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        plain.register(importlib.import_module(name), name=name)
    assert table(ours) == table(plain)
    assert {n for n, _ in ours.list_name_plugin()} == set(BUILTIN_PLUGINS)

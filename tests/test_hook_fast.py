"""The cd hook's quick start: `jam hook SHELL` fills in the interpreter and a bootstrap with the
sys.path entries jam needs, and the hook runs `python -I -S -c BOOT hook-fetch -- DIR` (no
site, nothing from the environment or the directory just entered), falling back to the jam
script when the bootstrap exits 121. Real shells (bash, zsh, fish) run the printed hook; the
process's modules are read from $JAM_DEBUG_MODULES to tell which start answered."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_file, require_tool

SHELLS = ["bash", "zsh", "fish"]
FLAGS = {"bash": ["--norc", "--noprofile", "-c"], "zsh": ["-f", "-c"], "fish": ["--no-config", "-c"]}
EXIT_BOOT = 121


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tree(jam_root):
    """A root with 3 stubs in data/."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    content = {f"data/f{i}": _digest(make_file(jam_root.path / f"data/f{i}", 70_000 + i, seed=i)) for i in range(3)}
    assert len(stash(jam_root, ["data"], make_plugin_manager()).done) == 3
    return jam_root, content


def _hook(shell: str, jam_bin: str, env: dict) -> str:
    res = subprocess.run([jam_bin, "hook", shell], env=env, capture_output=True, text=True, check=True)
    return res.stdout


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, JAM_DISABLE="", JAM_DEBUG_MODULES=str(tmp_path / "modules"), JAM_BACKGROUND="0")
    env.pop("PROMPT_COMMAND", None)
    env.pop("PYTHONPATH", None)
    return env


def _cd(shell: str, hook_text: str, where: Path, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """A real `shell` that sources the hook and cds into ``where`` (bash: then what its
    PROMPT_COMMAND runs, as a prompt would)."""
    exe = require_tool(shell)
    hook = tmp_path / f"hook.{shell}"
    hook.write_text(hook_text)
    after = "; _jam_hook" if shell == "bash" else ""
    script = f"source {str(hook)!r}; cd {str(where)!r}{after}"
    return subprocess.run([exe, *FLAGS[shell], script], env=env, capture_output=True, text=True, timeout=120)


def _modules(tmp_path: Path) -> set[str]:
    path = tmp_path / "modules"
    return set(path.read_text().split()) if path.exists() else set()


def _back(root, content) -> bool:
    return all(_digest((root.path / rel).read_bytes()) == d for rel, d in content.items())


@pytest.mark.parametrize("shell", SHELLS)
def test_the_hook_fetches_through_the_site_less_start(shell, tree, jam_bin, tmp_path):
    root, content = tree
    env = _env(tmp_path)
    text = _hook(shell, jam_bin, env)
    assert sys.executable in text or os.path.realpath(sys.executable) in text
    res = _cd(shell, text, root.path / "data", env, tmp_path)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr, res.stderr
    assert "failed" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _back(root, content), "differs"
    mods = _modules(tmp_path)
    assert "jam_core.hook.fetch" in mods
    assert "site" not in mods, "the hook's fetch started with site"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_moved_jam_falls_back_to_the_script(shell, tree, jam_bin, tmp_path):
    """The recorded jam is not the one found (a reinstall elsewhere): the bootstrap exits 121
    and the hook runs the jam script, which fetches; nothing said, the hook stays on."""
    import jam_core.cli.hook_server

    root, content = tree
    env = _env(tmp_path)
    text = _hook(shell, jam_bin, env)
    recorded = os.path.abspath(jam_core.cli.hook_server.__file__)
    assert text.count(recorded) == 1
    text = text.replace(recorded, "/nonexistent/jam_core/cli/hook_server.py")
    res = _cd(shell, text, root.path / "data", env, tmp_path)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr, res.stderr
    assert "failed" not in res.stderr and "off in this shell" not in res.stderr, res.stderr
    assert _back(root, content), "differs"
    assert "site" in _modules(tmp_path)  # the jam script answered


@pytest.mark.parametrize("shell", SHELLS)
def test_unimportable_recorded_paths_fall_back(shell, tree, jam_bin, tmp_path):
    """The recorded sys.path no longer holds jam (a moved venv): the script answers."""
    root, content = tree
    env = _env(tmp_path)
    text = _hook(shell, jam_bin, env)
    start = text.index("p=[")
    end = text.index("]", start)
    text = text[:start] + "p=[]" + text[end + 1:]  # the bare interpreter's path alone
    res = _cd(shell, text, root.path / "data", env, tmp_path)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr, res.stderr
    assert "failed" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _back(root, content), "differs"


def _boot_cmd(directory: Path) -> list[str]:
    from jam_core.cli.hook import boot_paths, bootstrap

    return [sys.executable, "-I", "-S", "-c", bootstrap(boot_paths()), "hook-fetch", "--", str(directory)]


@pytest.mark.parametrize("shell", SHELLS)
def test_nothing_is_imported_from_the_directory_entered(shell, tree, jam_bin, tmp_path):
    """-I: the directory just entered (the hook's working directory) is not on sys.path, so a
    json.py planted there is never imported."""
    root, content = tree
    marker = tmp_path / "planted-ran"
    (root.path / "data/json.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(7)\n")
    env = _env(tmp_path)
    res = _cd(shell, _hook(shell, jam_bin, env), root.path / "data", env, tmp_path)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr, res.stderr
    assert not marker.exists()
    assert _back(root, content), "differs"
    assert "site" not in _modules(tmp_path)


def test_pythonpath_hands_over_to_the_script(tree, tmp_path):
    """$PYTHONPATH is ignored by -I: the bootstrap leaves the fetch to the script, which honours
    it, before touching anything."""
    root, content = tree
    env = dict(_env(tmp_path), PYTHONPATH=str(tmp_path / "elsewhere"))
    res = subprocess.run(_boot_cmd(root.path / "data"), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == EXIT_BOOT, res.stderr
    assert not _back(root, content)


def test_a_root_that_needs_more_than_the_dir_backend_hands_over(tree, tmp_path):
    """A third-party policy or remote kind may live where only site finds it (a .pth, an import
    hook): the site-less start fetches nothing and exits 121; the script does the fetch."""
    root, content = tree
    with open(root.config_path, "a") as f:
        f.write("\n[policy.thirdparty]\nwhatever = 1\n")
    res = subprocess.run(_boot_cmd(root.path / "data"), env=_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == EXIT_BOOT, res.stderr
    assert not _back(root, content)


def test_other_forms_hand_over(tmp_path):
    """Only the plain `hook-fetch -- DIR` is answered; --help and the like go to the script."""
    cmd = _boot_cmd(tmp_path)
    res = subprocess.run(cmd[:5] + ["hook-fetch", "--help"], env=_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == EXIT_BOOT and not res.stdout, res.stdout


def test_hook_with_bin_runs_that_jam_only(jam_bin, tmp_path):
    """`--bin` (tests, packagers) names the jam the hook runs: no site-less start then."""
    env = _env(tmp_path)
    for shell in SHELLS:
        text = subprocess.run([jam_bin, "hook", shell, "--bin", "/opt/x/jam"], env=env, capture_output=True,
                              text=True, check=True).stdout
        assert "-c" in text and sys.executable not in text and "c.boot()" not in text


def _fetch_and_show(directory: Path, tmp_path: Path, show: str) -> subprocess.CompletedProcess:
    """The hook's fetch in a fresh process (as the site-less start runs it), then ``show``."""
    code = ("import sys, jam_core.cli as c\n"
            "from jam_core.cli.hook import run_hook_fetch\n"
            f"code = run_hook_fetch({str(directory)!r})\n"
            f"print({show})\n")
    return subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)


def test_the_fetch_builds_no_policy_records(tree, tmp_path):
    """FileRecord and Nomination (dataclass decorations: ~5 M instructions each) are built on
    first use; the hook's fetch never uses them. They are still the model's own classes."""
    root, content = tree
    res = _fetch_and_show(root.path / "data", tmp_path,
                          "code, sorted(n for n in ('FileRecord', 'Nomination') if n in vars(sys.modules['jam_core.model']))")
    assert res.stdout.strip() == "0 []", res.stderr
    assert _back(root, content), "differs"


def test_the_policy_records_are_built_once_whoever_asks(tmp_path):
    code = ("import threading, pickle, jam_core.model as m\n"
            "seen = []\n"
            "ts = [threading.Thread(target=lambda: seen.append(m.FileRecord)) for _ in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "from jam_core import FileRecord, Nomination\n"
            "r = FileRecord('a', 1, 2.0, 3.0, 4.0)\n"
            "assert all(c is FileRecord for c in seen) and pickle.loads(pickle.dumps(r)) == r\n"
            "assert m.__getattr__('FileRecord') is FileRecord and m.__getattr__('Nomination') is Nomination\n"
            "assert repr(Nomination('p', 'age', 'old')) == \"Nomination(path='p', policy='age', reason='old')\"\n"
            "assert 'FileRecord' in dir(m) and FileRecord.__qualname__ == 'FileRecord'\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "ok", res.stderr


def _count_checkpoints(monkeypatch, root) -> list[bool]:
    """Record, at each catalog close, whether SQLite checkpointed and removed the WAL then (it
    does when the process's last connection to the file closes)."""
    from jam_core.catalog import Catalog

    wal = root.jam_dir / "catalog.db-wal"
    closes: list[bool] = []
    orig = Catalog.close

    def close(self):
        before = wal.exists()
        orig(self)
        closes.append(before and not wal.exists())

    monkeypatch.setattr(Catalog, "close", close)
    return closes


@pytest.mark.parametrize("mark", [False, True], ids=["no-mark", "shell-mark"])
def test_one_catalog_checkpoint_per_hook_fetch(tree, monkeypatch, mark):
    """The fold, the checkout and the visit's record share one checkpoint (the WAL made
    durable into the database and removed: four fdatasyncs) at the end, not one each."""
    from jam_core.cli.hook import run_hook_fetch
    from jam_core.hook.marks import encode

    root, content = tree
    monkeypatch.setenv("JAM_BACKGROUND", "0")
    if mark:  # what the shell's cd leaves: the fold records it in the catalog
        (root.jam_dir / "visits").mkdir(mode=0o700, exist_ok=True)
        (root.jam_dir / "visits" / os.fsdecode(encode("data"))).touch()
    closes = _count_checkpoints(monkeypatch, root)
    assert run_hook_fetch(str(root.path / "data")) == 0
    assert _back(root, content), "differs"
    assert len(closes) >= 3 and closes[-1] and sum(closes) == 1, closes
    assert not (root.jam_dir / "catalog.db-wal").exists()  # the held connection was closed


def test_the_held_catalog_is_closed_before_a_background_fork(tree, monkeypatch):
    """No SQLite connection crosses the background fetch's fork: the held one is closed (and
    checkpointed) in the parent before it forks."""
    from jam_core.cli import hook as cli_hook
    from jam_core.hook import fetch as hook_fetch

    root, content = tree
    monkeypatch.setenv("JAM_BACKGROUND", "1")
    seen = []

    def fork():
        seen.append([a for a in arrived if a.held is not None])  # connections still open now
        return 1  # the parent's side only; the child is not started

    arrived = []
    orig_arrive = hook_fetch.arrive

    def arrive(directory):
        a = orig_arrive(directory)
        arrived.append(a)
        return a

    monkeypatch.setattr(hook_fetch, "arrive", arrive)
    monkeypatch.setattr(cli_hook.os, "fork", fork)
    assert cli_hook.run_hook_fetch(str(root.path / "data")) == 0
    assert len(arrived) == 1 and seen == [[]], seen


def test_a_fetched_directory_leaves_the_index_without_shutil(tree, tmp_path):
    """The common case, a directory fetched whole, removes a leaf of ROOT/.jam/stubdirs with
    one rmdir: no shutil (and its compression modules) on the hook's path."""
    root, content = tree
    assert (root.jam_dir / "stubdirs/data").is_dir()
    res = _fetch_and_show(root.path / "data", tmp_path, "code, 'shutil' in sys.modules")
    assert res.stdout.strip() == "0 False", res.stderr
    assert _back(root, content), "differs"
    assert not (root.jam_dir / "stubdirs/data").exists()


def test_a_subtree_of_the_index_still_goes(tree):
    """A directory of the index with directories below it (planted, or left by another depth)
    is removed whole, through descriptors."""
    from jam_core.hook.index import sync

    root, _ = tree
    base = root.jam_dir / "stubdirs"
    (base / "data/x/y").mkdir(parents=True)
    (base / "data/x/y/junk").write_text("")
    os.symlink("/", base / "data/x/link")
    sync(str(base), set())
    assert not (base / "data").exists() and os.listdir("/")


@pytest.mark.slow
def test_a_pip_installed_jam_in_its_own_venv(tree, tmp_path):
    """A real `pip install` of the wheel into a fresh venv (as pipx makes one; its dependencies
    reached through a .pth line): the hook that venv's jam prints fetches through the
    site-less start, with the venv's own jam_core."""
    import shutil
    import sysconfig

    root, content = tree
    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                               ".pytest_cache", ".ruff_cache", "tests", "bench"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wh"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (wheel,) = (tmp_path / "wh").glob("*.whl")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
                          "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (site_dir,) = (venv / "lib").glob("python3*/site-packages")
    (site_dir / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # pluggy, blake3, click...
    env = _env(tmp_path)
    text = _hook("zsh", str(venv / "bin/jam"), env)
    assert str(site_dir / "jam_core/cli/hook_server.py") in text  # the venv's own jam is the one checked
    res = _cd("zsh", text, root.path / "data", env, tmp_path)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr, res.stderr
    assert "failed" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _back(root, content), "differs"
    assert "site" not in _modules(tmp_path)


@pytest.mark.parametrize("shell", SHELLS)
def test_the_recorded_interpreter_and_bootstrap_survive_the_shell_s_quoting(shell, tmp_path):
    """Paths with quotes, spaces, $(...), backticks, backslashes and newlines are written into
    the hook as data: the shell reads back exactly the interpreter and bootstrap jam wrote, and
    runs nothing of them."""
    from jam_core.cli.hook import bootstrap, render

    marker = tmp_path / "injected"
    weird = [f"/tmp/a b'c\"d$(touch {marker})`touch {marker}`\\e\nf", "/tmp/x;touch " + str(marker)]
    boot = bootstrap(weird)
    py = f"/opt/py th'on$(touch {marker})/bin/python3"
    text = render(shell, "/opt/jam/bin/jam", str(tmp_path / "roots"), py, boot)
    script = tmp_path / f"hook.{shell}"
    script.write_text(text)
    out = tmp_path / "out"
    show = {"fish": f"printf '%s\\0%s' \"$_jam_py\" \"$_jam_boot\" > {str(out)!r}",
            }.get(shell, f"printf '%s\\0%s' \"$_JAM_PY\" \"$_JAM_BOOT\" > {str(out)!r}")
    exe = require_tool(shell)
    res = subprocess.run([exe, *FLAGS[shell], f"source {str(script)!r}; {show}"],
                         env=dict(os.environ, JAM_DISABLE="1"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes().split(b"\0") == [py.encode(), boot.encode()]
    assert not marker.exists()


# The hook's path compiles no regex at import (units.LazyRe: each compile ~0.4 M instructions).
_COMPILES_AT_IMPORT = r"""
import re, sys
seen = []
real = re._compile
def spy(pattern, flags):
    f = sys._getframe(1)
    while f is not None and f.f_globals.get("__name__", "").startswith("re"):
        f = f.f_back
    if f is not None and f.f_globals.get("__name__", "").startswith("jam_core"):
        seen.append((f.f_globals["__name__"], pattern))
    return real(pattern, flags)
re._compile = spy
import jam_core.fs, jam_core.units, jam_core.objects, jam_core.hook.marks, jam_core.hook.fetch
import jam_core.ops.refs, jam_core.ops.remotes
print(repr(seen))
"""


def test_the_hook_s_modules_compile_no_regex_at_import():
    res = subprocess.run([sys.executable, "-c", _COMPILES_AT_IMPORT], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_a_lazy_regex_compiles_once_on_first_use_and_matches_as_re_does(monkeypatch):
    import copy
    import re

    from jam_core.units import LazyRe

    calls = []
    real = re.compile
    monkeypatch.setattr(re, "compile", lambda *a: calls.append(a) or real(*a))
    hexid, bad = LazyRe(r"\A[0-9a-f]{4}\Z"), LazyRe(rb"%(?![0-9A-Fa-f]{2})")
    copy.copy(hexid)
    assert calls == [] and "0-9a-f" in repr(hexid)
    assert hexid.match("beef") and hexid.fullmatch("beef") and not hexid.match("bee") and not hexid.match("BEEF")
    assert bad.search(b"%2G") and not bad.search(b"%2F")
    assert calls == [(r"\A[0-9a-f]{4}\Z", 0), (rb"%(?![0-9A-Fa-f]{2})", 0)]
    assert hexid.pattern == r"\A[0-9a-f]{4}\Z" and hexid.match("cafe").group(0) == "cafe"
    assert len(calls) == 2  # later uses go straight to the compiled pattern


# Which dataclasses the hook's path decorates at import (each decoration execs generated code:
# ~3-5 M instructions). Result and Users are plain classes; these are what is left.
_DECORATED_AT_IMPORT = r"""
import dataclasses
seen = []
real = dataclasses._process_class
def spy(cls, *a, **k):
    seen.append(cls.__qualname__)
    return real(cls, *a, **k)
dataclasses._process_class = spy
import jam_core.hook.fetch, jam_core.ops.refs, jam_core.ops.remotes, jam_core.cli.common, jam_core.manager
print(" ".join(sorted(seen)))
"""
STILL_DATACLASSES = {"Remote", "StubRecord", "Entry"}  # model (public API: dataclasses.replace), stub, scan


def test_the_hook_s_modules_decorate_no_dataclass_but_the_public_records():
    res = subprocess.run([sys.executable, "-c", _DECORATED_AT_IMPORT], capture_output=True, text=True, check=True)
    assert set(res.stdout.split()) <= STILL_DATACLASSES, res.stdout


def test_result_and_users_keep_their_constructor_equality_and_repr():
    from jam_core.ops.common import Result
    from jam_core.ops.refs import Users

    a, b = Result(), Result()
    a.done.append(("f", 3))
    assert b.done == [] and a != b and a.bytes == 3 and a.exit_code == 0
    assert Result(done=[("f", 3)]) == a and Result(aborted="gone").exit_code == 1
    assert repr(a).startswith("Result(done=[('f', 3)]") and "partly=False" in repr(a)
    u, v = Users(), Users()
    u.refs["r"] = (1, {"b3:x"})
    assert v.refs == {} and u.needing("b3:x") == {"r": 1} and "removing={}" in repr(u)
    with pytest.raises(AttributeError):
        a.stray = 1  # slotted: a misspelled field is an error, not a silent new attribute

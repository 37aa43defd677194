"""The cd hooks in real shells, driven through a terminal the way a person types.

Each test gets its own HOME and XDG dirs (conftest), a root with stubs, and a shell started
without the user's config (bash --norc, zsh -f, fish --no-config) that installs the hook twice.
The hook calls jam through a wrapper that logs every invocation, so "no process outside a
root" is checked, not assumed. Synchronisation is on prompt markers, never on sleeps.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_file, require_tool
from tests.terminal import PromptShell

pexpect = pytest.importorskip("pexpect")

PROMPT = "JAMPROMPT>"
SHELLS = ["bash", "zsh", "fish"]


def _wrapper(path: Path, log: Path, target: str, slow: bool = False) -> str:
    """A `jam` that logs its arguments, then runs the real one (optionally with a slow backend)."""
    if slow:
        body = f"""#!{sys.executable}
import os, sys, time
with open({str(log)!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
import jam_dir
_orig = jam_dir.fetch
def fetch(remote, oid, dest, size, session):
    print(f"slow-fetch {{os.path.basename(str(dest))}}", file=sys.stderr, flush=True)
    time.sleep(0.5)  # a slow remote (not synchronisation: the test waits on this line)
    return _orig(remote=remote, oid=oid, dest=dest, size=size, session=session)
fetch.jam_impl = _orig.jam_impl
jam_dir.fetch = fetch
from jam_core.cli import main
main()
"""
    else:
        body = f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\nexec {shlex.quote(target)} \"$@\"\n"
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


class Shell(PromptShell):
    """One interactive shell under pexpect, with the hook installed twice."""

    def __init__(self, kind: str, jam: str, hook_bin: str, cwd: Path, env: dict):
        super().__init__(kind, PROMPT, cwd, env)
        src = {"fish": f"{shlex.quote(jam)} hook fish --bin {shlex.quote(hook_bin)} | source"}.get(
            kind, f'eval "$({shlex.quote(jam)} hook {kind} --bin {shlex.quote(hook_bin)})"')
        self.run(src)
        self.run(src)  # installing twice leaves one hook

    def type(self, line: str) -> str:
        """Type a line and wait for the next prompt (keeps $? for the next line)."""
        self.p.sendline(line)
        self.p.expect_exact(PROMPT)
        return self.p.before

    def status_of_last(self) -> int:
        var = "$status" if self.kind == "fish" else "$?"
        self.p.sendline(f"echo rc=:{var}:")
        self.p.expect(r"rc=:(\d+):")
        code = int(self.p.match.group(1))
        self.p.expect_exact(PROMPT)
        return code

@pytest.fixture
def tree(jam_root):
    """A root with stubs in data/ (3 files) and data/deep/ (1), local files elsewhere."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    root = jam_root
    content = {}
    for i, rel in enumerate(["data/a.bin", "data/b.bin", "data/c with space.bin", "data/deep/d.bin"]):
        content[rel] = make_file(root.path / rel, 100_000 + i, seed=i)
    make_file(root.path / "plain/local.bin", 1000, seed=9)
    (root.path / "nostubs/sub").mkdir(parents=True)
    res = stash(root, ["data"], make_plugin_manager())
    assert len(res.done) == 4
    return root, content


def is_stub(path: Path) -> bool:
    from jam_core.scan import STUB, classify

    return classify(str(path), os.lstat(path))[0] == STUB


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(TERM="xterm", LC_ALL="C.UTF-8", JAM_DISABLE="", SHELL="/bin/sh")
    e.pop("JAM_BACKGROUND", None)
    e.pop("PROMPT_COMMAND", None)
    return e


@pytest.fixture
def jam_exe(jam_bin):
    return jam_bin


@pytest.fixture
def logged(tmp_path, jam_exe):
    log = tmp_path / "jam-calls.log"
    log.write_text("")
    return _wrapper(tmp_path / "jam-logged", log, jam_exe), log


@pytest.fixture(params=SHELLS)
def shell(request, tree, logged, jam_exe, env, tmp_path):
    root, _ = tree
    hook_bin, _log = logged
    sh = Shell(request.param, jam_exe, hook_bin, tmp_path, env)
    yield sh
    sh.close()


def test_cd_into_stubbed_dir_fetches_its_own_stubs(shell, tree, logged):
    root, content = tree
    shell.run(f"cd {shlex.quote(str(root.path / 'data'))}")
    for rel in ["data/a.bin", "data/b.bin", "data/c with space.bin"]:
        assert not is_stub(root.path / rel)
        assert (root.path / rel).read_bytes() == content[rel]
    assert is_stub(root.path / "data/deep/d.bin")  # depth 0: the directory's own stubs
    shell.run("cd deep")
    assert (root.path / "data/deep/d.bin").read_bytes() == content["data/deep/d.bin"]
    # Everything is local now: the index says so and cd starts no process.
    _, log = logged
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("hook-fetch") for c in calls), calls
    shell.run("cd ..; cd deep; cd ../..; cd data")
    assert len(log.read_text().splitlines()) == 2


def test_outside_roots_and_nothing_to_fetch_start_no_process(shell, tree, logged, tmp_path):
    root, _ = tree
    _, log = logged
    (tmp_path / "elsewhere/x").mkdir(parents=True)
    for d in [tmp_path / "elsewhere", tmp_path / "elsewhere/x", Path("/"), root.path / "plain",
              root.path / "nostubs", root.path / "nostubs/sub", root.path / ".jam"]:
        shell.run(f"cd {shlex.quote(str(d))}")
    assert log.read_text() == ""
    assert is_stub(root.path / "data/a.bin")


def test_status_survives_the_hook(shell, tree, logged):
    root, content = tree
    shell.type(f"cd {shlex.quote(str(root.path / 'data'))}; false")  # the hook fetches here
    assert shell.status_of_last() == 1
    assert (root.path / "data/a.bin").read_bytes() == content["data/a.bin"]
    shell.type(f"false; cd {shlex.quote(str(root.path / 'data/deep'))}")
    assert shell.status_of_last() == 0  # cd's own status, though the hook ran jam
    assert (root.path / "data/deep/d.bin").read_bytes() == content["data/deep/d.bin"]


def test_hook_writes_nothing_on_stdout_and_installs_once(tree, logged, jam_exe, env, tmp_path):
    root, _ = tree
    hook_bin, log = logged
    for kind in SHELLS:
        exe = require_tool(kind)
        src = {"fish": f"{jam_exe} hook fish --bin {hook_bin} | source"}.get(kind, f'eval "$({jam_exe} hook {kind} --bin {hook_bin})"')
        script = {
            "bash": f'{src}; {src}; declare -p PROMPT_COMMAND; cd {shlex.quote(str(root.path / "data"))}; _jam_hook',
            "zsh": f'{src}; {src}; print -r -- "hooks: $chpwd_functions"; cd {shlex.quote(str(root.path / "data"))}',
            "fish": f'{src}; {src}; functions -q _jam_on_pwd; and echo "hooks: _jam_on_pwd"; cd {shlex.quote(str(root.path / "data"))}',
        }[kind]
        args = {"bash": ["--norc", "--noprofile", "-c"], "zsh": ["-f", "-c"], "fish": ["--no-config", "-c"]}[kind]
        out = subprocess.run([exe, *args, script], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 1, (kind, out.stdout)  # only the probe's own line
        assert lines[0].count("_jam_hook") == 1 or lines[0].count("_jam_chpwd") == 1 \
            or lines[0] == "hooks: _jam_on_pwd", lines
        if kind == "bash":  # the array form of PROMPT_COMMAND too
            out = subprocess.run([exe, *args, f'PROMPT_COMMAND=(true "echo x"); {src}; {src}; declare -p PROMPT_COMMAND'],
                                 env=env, capture_output=True, text=True, cwd=tmp_path)
            assert out.stdout.strip() == 'declare -a PROMPT_COMMAND=([0]="_jam_hook && :" [1]="true" [2]="echo x")'
    assert not is_stub(root.path / "data/a.bin")


def test_jam_disable(shell, tree, logged):
    root, _ = tree
    var = "set -gx JAM_DISABLE 1" if shell.kind == "fish" else "export JAM_DISABLE=1"
    shell.run(var)
    shell.run(f"cd {shlex.quote(str(root.path / 'data'))}")
    assert is_stub(root.path / "data/a.bin")
    assert logged[1].read_text() == ""


def test_above_the_cap_prints_one_line_and_fetches_nothing(shell, tree, logged):
    root, _ = tree
    with open(root.config_path, "a") as f:
        f.write('\n[hook]\nmax_fetch = "200KB"\n')
    out = shell.run(f"cd {shlex.quote(str(root.path / 'data'))}")
    lines = [line for line in out.splitlines() if line.startswith("jam:")]
    assert len(lines) == 1, out
    assert "3 stubs (300.0 KB)" in lines[0] and "jam checkout ." in lines[0]
    assert all(is_stub(root.path / f"data/{n}") for n in ["a.bin", "b.bin", "c with space.bin"])


def test_depth_from_config(shell, tree, logged):
    root, content = tree
    with open(root.config_path, "a") as f:
        f.write("\n[hook]\ndepth = 1\n")
    shell.run(f"cd {shlex.quote(str(root.path))}")  # config newer than the index: jam asked once
    assert (root.path / "data/a.bin").read_bytes() == content["data/a.bin"]  # one level down
    assert is_stub(root.path / "data/deep/d.bin")  # two levels down: not from the top
    shell.run("cd data")
    assert (root.path / "data/deep/d.bin").read_bytes() == content["data/deep/d.bin"]


def test_missing_jam_warns_once(tree, env, tmp_path, jam_exe):
    root, _ = tree
    gone = tmp_path / "gone/jam"
    for kind in SHELLS:
        sh = Shell(kind, jam_exe, str(gone), tmp_path, env)
        try:
            out = sh.run(f"cd {shlex.quote(str(root.path / 'data'))}")
            out += sh.run("cd deep")
            out += sh.run("cd ..")
            assert out.count("it is off in this shell") == 1, out
            assert "Traceback" not in out
        finally:
            sh.close()


def test_background_fetch(shell, tree, logged, env):
    root, content = tree
    with open(root.config_path, "a") as f:
        f.write("\n[hook]\nbackground = true\n")
    shell.run(f"cd {shlex.quote(str(root.path / 'data'))}")
    shell.p.expect(r"jam: fetched 3 files")  # the line that says it is done
    for rel in ["data/a.bin", "data/b.bin", "data/c with space.bin"]:
        assert (root.path / rel).read_bytes() == content[rel]
    assert shell.status_of_last() == 0


@pytest.mark.slow
def test_ctrl_c_during_a_slow_fetch(tree, env, tmp_path, jam_exe):
    root, content = tree
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    for i in range(40):  # more than one group (hook-fetch checks out 32 files at a time)
        content[f"many/f{i:02d}"] = make_file(root.path / f"many/f{i:02d}", 70_000, seed=100 + i)
    stash(root, ["many"], make_plugin_manager())
    log = tmp_path / "slow.log"
    slow = _wrapper(tmp_path / "jam-slow", log, jam_exe, slow=True)
    for kind in SHELLS:
        sh = Shell(kind, jam_exe, slow, tmp_path, env)
        try:
            sh.p.sendline(f"cd {shlex.quote(str(root.path / 'many'))}")
            for _ in range(34):  # the first group is done and the second under way
                sh.p.expect("slow-fetch")
            sh.p.sendcontrol("c")
            sh.p.expect("jam: interrupted")
            sh.p.expect_exact(PROMPT)
            out = sh.run("echo still-here")
            assert "still-here" in out and "Traceback" not in sh.p.before
            states = {rel: is_stub(root.path / rel) for rel in content if rel.startswith("many/")}
            assert 32 <= sum(not s for s in states.values()) < 40, states  # kept what was done
            for rel, stub in states.items():
                if not stub:
                    assert (root.path / rel).read_bytes() == content[rel]
            sh.run("cd ..")
        finally:
            sh.close()
        # The rest comes back on the next visit.
        subprocess.run([jam_exe, "checkout", str(root.path / "many")], check=True, capture_output=True, env=env)
        for rel in states:
            assert (root.path / rel).read_bytes() == content[rel]
        stash(root, ["many"], make_plugin_manager())


def test_interrupted_checkout_leaves_no_temporary_files(tree):
    from jam_core import hookimpl
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.checkout import checkout

    root, _ = tree

    class InterruptSecond:
        calls = 0

        @hookimpl
        def fetch(self, remote, oid, dest, size, session):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return None  # the dir backend does the work

    with pytest.raises(KeyboardInterrupt):
        checkout(root, ["data"], make_plugin_manager(extra=(InterruptSecond(),)))
    assert [n for n in os.listdir(root.path / "data") if n.startswith(".jam-")] == []


def test_shellcheck_bash_hook():
    exe = require_tool("shellcheck")
    out = subprocess.run([exe, "--shell=bash", str(REPO / "shell/jam.bash")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("kind", SHELLS)
def test_hook_files_parse(kind):
    exe = require_tool(kind)
    flag = {"bash": ["-n"], "zsh": ["-n"], "fish": ["--no-execute"]}[kind]
    out = subprocess.run([exe, *flag, str(REPO / f"shell/jam.{kind}")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_stubdirs_index_follows_stash_and_checkout(tree):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.checkout import checkout

    root, _ = tree
    idx = root.jam_dir / "stubdirs"
    marked = lambda: sorted(str(p.relative_to(idx)) for p in [idx, *idx.rglob("*")] if p.stat().st_mode & 0o1000)  # noqa: E731
    assert marked() == ["data", "data/deep"]
    checkout(root, ["data/deep"], make_plugin_manager())
    assert marked() == ["data"]
    assert not (idx / "data/deep").exists()
    checkout(root, ["data"], make_plugin_manager())
    assert marked() == []


def test_wanted_depth():
    from jam_core.hook.index import wanted

    stubs = ["a/b/c/f", "x", "a/g"]
    assert wanted(stubs, 0) == {"a/b/c", "", "a"}
    assert wanted(stubs, 1) == {"a/b/c", "a/b", "", "a"}
    assert wanted(stubs, None) == {"a/b/c", "a/b", "a", ""}


def test_hook_help_says_where_to_put_it(runner):
    from jam_core.cli import main

    out = runner.invoke(main, ["hook", "--help"]).output
    for line in ['eval "$(jam hook zsh)"', 'eval "$(jam hook bash)"', "jam hook fish | source", "~/.zshrc"]:
        assert line in out


# -- visits: every cd inside a root counts as use, without a process ------------------------

DAY = 86400
# A directory name with a space, a '%' that looks like an escape, a newline and a byte that is
# not UTF-8, and how each shell types it.
ODD = b"odd %41\nname\xff"
ODD_TYPED = {"bash": "$'odd %41\\nname\\xff'", "zsh": "$'odd %41\\nname\\xff'", "fish": "'odd %41'\\n'name'\\Xff"}


def marks(root) -> set[str]:
    """The directories (relative, "." = the root) the hooks marked as visited."""
    from jam_core.hook.marks import decode

    d = root.jam_dir / "visits"
    return {decode(n) for n in os.listdir(os.fsencode(d))} if d.is_dir() else set()


def test_cd_inside_a_root_marks_the_visit_without_a_process(shell, tree, logged):
    root, _ = tree
    odd = os.fsdecode(ODD)
    (root.path / "plain" / odd).mkdir()
    shell.run(f"cd {shlex.quote(str(root.path / 'plain'))}")
    shell.run(f"cd {ODD_TYPED[shell.kind]}")
    shell.run(f"cd {shlex.quote(str(root.path / 'nostubs/sub'))}")
    shell.run(f"cd {shlex.quote(str(root.path))}")
    shell.run(f"cd {shlex.quote(str(root.path / '.jam'))}")  # jam's own data is no visit
    assert marks(root) == {"plain", f"plain/{odd}", "nostubs/sub", "."}
    assert logged[1].read_text() == ""  # no jam process for any of them


def test_a_visit_in_the_shell_makes_old_files_recent_for_policies(shell, tree, logged, jam_exe, env):
    from jam_core.hook.index import refresh

    root, _ = tree
    for rel in ["old/x.bin", "old/y.bin", "elsewhere/z.bin"]:
        make_file(root.path / rel, 100_000, seed=len(rel))
        t = time_ago(60 * DAY)
        os.utime(root.path / rel, (t, t))
    with open(root.config_path, "a") as f:
        f.write('\n[policy.age]\nolder_than = "30d"\n')
    refresh(root)  # the index is newer than the config: cd asks jam nothing

    def planned() -> set[str]:
        out = subprocess.run([jam_exe, "stash", "--auto", "--dry-run"], cwd=root.path, env=env,
                             capture_output=True, text=True, check=True).stdout
        return {p for p in ["old/x.bin", "old/y.bin", "elsewhere/z.bin"] if p in out}

    assert planned() == {"old/x.bin", "old/y.bin", "elsewhere/z.bin"}
    shell.run(f"cd {shlex.quote(str(root.path / 'old'))}")
    assert marks(root) == {"old"}
    assert planned() == {"elsewhere/z.bin"}  # the visit made old/ recent
    assert marks(root) == set()  # folded into the catalog
    from jam_core.catalog import Catalog

    with Catalog(root.jam_dir / "catalog.db") as cat:
        uses = cat.uses()
    assert set(uses) == {"old/x.bin", "old/y.bin"}
    assert logged[1].read_text() == ""


def time_ago(seconds: float) -> float:
    import time

    return time.time() - seconds


def test_jam_disable_marks_nothing(shell, tree, logged):
    root, _ = tree
    shell.run("set -gx JAM_DISABLE 1" if shell.kind == "fish" else "export JAM_DISABLE=1")
    for d in ["plain", "nostubs/sub", "."]:
        shell.run(f"cd {shlex.quote(str(root.path / d))}")
    assert marks(root) == set()


@pytest.mark.parametrize("how", ["marks-dir-is-a-file", "mark-is-a-directory", "read-only"])
def test_unwritable_marks_do_not_break_the_prompt(shell, tree, logged, how):
    root, _ = tree
    d = root.jam_dir / "visits"
    if how == "marks-dir-is-a-file":
        d.rmdir()
        d.write_text("")
    elif how == "mark-is-a-directory":
        (d / "%2Fplain").mkdir()
    elif os.geteuid() == 0:  # root writes into read-only directories, not immutable ones
        subprocess.run([require_tool("chattr"), "+i", str(d)], check=True)
    else:
        d.chmod(0o555)
    try:
        shell.type(f"cd {shlex.quote(str(root.path / 'plain'))}; false")
        assert shell.status_of_last() == 1
        out = shell.run("cd ../nostubs")
        out += shell.run("echo still-here")
    finally:
        if how == "read-only" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        if d.is_dir():
            d.chmod(0o755)
    assert "still-here" in out
    for word in ("warning", "denied", "directory", "error", "jam:"):
        assert word not in out.lower(), out
    assert logged[1].read_text() == ""


def test_hostile_marks_are_dropped_safely(tree, tmp_path):
    from jam_core.catalog import Catalog
    from jam_core.hook.marks import encode, fold

    root, _ = tree
    outside = tmp_path / "outside"
    make_file(outside / "secret.bin", 1000, seed=3)
    (root.path / "escape").symlink_to(outside)
    passwd = tmp_path / "passwd"
    passwd.write_text("keep me\n")
    d = root.jam_dir / "visits"
    now = time_ago(0)
    hostile = {
        b"%2F..%2F..%2Fetc": now, b"%2F%2E%2E": now, b"%2F.jam": now, b"%2Fplain%2F..%2F..": now,
        b"%2Fplain%zz": now, b"%2F%2Fplain": now, b"\x01\x02\xfe junk": now, b"plain": now,
        b"%2Fescape": now, b"%2Fno%2Fsuch%2Fdir": now, b"%2F%00": now,
        # names that decode to an absolute path or climb out with `..` (item 4 of issue 8)
        b"%2F%2F%2Fetc%2Fpasswd": now, os.fsencode("%2F" + str(tmp_path).replace("/", "%2F")): now,
        b"%2Fplain%2F%2E%2E%2F%2E%2E%2Foutside": now, b"%2F%2E%2Fplain": now, b"%2F..%2F": now,
        b"%2Fdata%2Fdeep%2F..": now, b"%2F.jam%2Fvisits": now, b"%2F%2E%6Aam": now,
        encode("nostubs"): 4e12,  # year 128,000
        encode("nostubs/sub"): -5.0,
    }
    for name, t in hostile.items():
        p = os.path.join(os.fsencode(d), name)
        with open(p, "wb") as f:
            f.write(b"\x00\xff" * 100)
        os.utime(p, (t, t))
    os.symlink(passwd, os.path.join(os.fsencode(d), encode("data")))  # not a regular file
    junk_dir = d / encode("plain").decode()
    (junk_dir / "sub").mkdir(parents=True)  # a directory, not a mark
    os.symlink(outside, junk_dir / "sub/link")
    good = time_ago(3 * DAY)
    with open(os.path.join(os.fsencode(d), encode("data/deep")), "wb"):
        pass
    os.utime(os.path.join(os.fsencode(d), encode("data/deep")), (good, good))
    with Catalog(root.jam_dir / "catalog.db") as cat:
        before = cat.uses()
        cat.record_use(["data/deep/newer"], good + 100)
    assert fold(root) == 1
    with Catalog(root.jam_dir / "catalog.db") as cat:
        uses = cat.uses()
    assert {k: v for k, v in uses.items() if k not in before} == {
        "data/deep/d.bin": pytest.approx(good, abs=1e-3), "data/deep/newer": good + 100}
    assert os.listdir(d) == []
    assert not (root.jam_dir / "visits.folding").exists()
    assert passwd.read_text() == "keep me\n" and (outside / "secret.bin").exists()
    assert fold(root) == 0  # nothing left, nothing to do


@pytest.mark.parametrize("rel", [".", "a", "a b/c", "per%41cent", "new\nline", "bad\udcffbyte", "%2F"])
def test_mark_names_round_trip(rel):
    from jam_core.hook.marks import decode, encode

    assert decode(encode(rel)) == rel


def test_hook_fetch_folds_the_marks(tree, jam_exe, env):
    from jam_core.catalog import Catalog
    from jam_core.hook.marks import encode

    root, _ = tree
    (root.jam_dir / "visits" / encode("plain").decode()).touch()
    subprocess.run([jam_exe, "hook-fetch", str(root.path / "data")], env=env, check=True, capture_output=True)
    assert marks(root) == set()
    with Catalog(root.jam_dir / "catalog.db") as cat:
        assert "plain/local.bin" in cat.uses()

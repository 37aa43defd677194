"""Review R10: a hostile user at the command line, in the config and in the TUI.

Every test runs on a real root (real xattrs, a real dir remote). A hole found is a test marked
``xfail(strict=True, reason="BUG: ...")``; a guard that holds is kept only if its test was seen
failing with that guard commented out (named in the docstring).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import resource
import subprocess
import sys

import pytest

from jam_core.cli import main
from tests.conftest import make_file
from tests.safety_support import JAM, make_tree

ESC_PAYLOADS = ("\x1b]0;pwn\x07", "\x1b[2J", "\r")


def invoke(runner, *args, color=False):
    """``jam ARGS`` in process; ``color=True`` is a terminal (click strips nothing)."""
    return runner.invoke(main, list(args), color=color)


def one_line(res) -> str:
    """The single ``jam: `` line a mistake gets on stderr (never a traceback, never usage text)."""
    err = res.stderr
    assert "Traceback" not in err and "Traceback" not in res.output, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("jam: "), err
    return lines[0]


def no_control(text: str) -> None:
    """Nothing a terminal would act on: no ESC, BEL, CR, and no bidi override."""
    for c in ("\x1b", "\x07", "\r", "\u202e", "\u2066", "\u2067"):
        assert c not in text, repr(text)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    t = make_tree(tmp_path)
    monkeypatch.chdir(t.root)
    return t


def tree_state(path) -> dict:
    """Every entry under ``path``: (mode, size, mtime_ns, user.jam) (what 'nothing changed' means)."""
    out = {}
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            try:
                x = os.getxattr(p, "user.jam", follow_symlinks=False)
            except OSError:
                x = None
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, x)
    return out


# -- 1. output injection ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["stash", "checkout", "status", "log"])
def test_an_error_naming_a_hostile_path_outside_the_root_sends_no_escape_to_the_terminal(tree, runner, command):
    """`jam stash ~/Downloads/*` where a file of Downloads is named ``x\\e[2J``: the error line
    names it escaped, as every other jam line does (show_path), never the raw bytes.
    Guard (mutation-checked): JamGroup.invoke prints a JamError as ``show_text(exc)`` (cli/app.py)."""
    outside = tree.root.parent / "x\x1b]0;pwn\x07\x1b[2J"
    make_file(outside, 100)
    res = invoke(runner, command, str(outside), color=True)
    assert res.exit_code == 2
    line = one_line(res)
    no_control(line)
    assert "x" in line


def test_doctor_report_on_a_hostile_dirty_stub_sends_no_control_characters(tree, runner):
    """Guard (mutation-checked): ops/doctor.keep_both_hint quotes a non-printable name as $'...\\xHH'
    (_shell_word), and cli/doctor prints each detail through show_text."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    name = "a\x1b]0;pwn\x07\x1b[2J\r.bin"
    make_file(tree.root / name, 100_000)
    assert len(stash(Root.find(tree.root), [name], make_plugin_manager()).done) == 1
    with open(tree.root / name, "r+b") as f:  # written into: doctor suggests --keep-both with its name
        f.seek(50_000)
        f.write(b"mine")
    res = invoke(runner, "doctor")  # piped: click strips CSI sequences, nothing else
    assert res.exit_code == 1
    assert "dirty" in res.output
    assert "--keep-both $'a\\x1b]0;pwn\\x07\\x1b[2J\\x0d.bin'" in res.output, res.output  # bash reads it back
    no_control(res.output)
    no_control(res.stderr)


def test_keep_both_message_names_the_new_file_escaped(tree, runner):
    """Guard (mutation-checked): cli/common.report prints each reason as ``show_text(why)``."""
    name = "k\x1b]0;pwn\x07\x1b[2J.bin"
    make_file(tree.root / name, 100_000)
    assert invoke(runner, "stash", name).exit_code == 0
    with open(tree.root / name, "r+b") as f:
        f.seek(50_000)
        f.write(b"mine")
    res = invoke(runner, "checkout", "--keep-both", name, color=True)
    assert "stashed version" in res.stderr, (res.output, res.stderr)
    no_control(res.output)
    no_control(res.stderr)


def test_a_bidi_override_in_a_name_is_shown_escaped(tree, runner):
    """``invoice\\u202efdp.exe`` shows as ``invoiceexe.pdf`` on a terminal: `jam where` and
    the stash report must show the override escaped, like any control character.
    Guard (mutation-checked): cli/common.show_text escapes every character not ``str.isprintable()``."""
    name = "invoice\u202efdp.exe"
    make_file(tree.root / name, 100_000)
    res = invoke(runner, "stash", name)
    assert res.exit_code == 0
    res = invoke(runner, "where", name)
    assert res.exit_code == 0 and "vault" in res.output
    no_control(res.output)


def test_a_remotes_error_text_reaches_the_terminal_escaped(tree, runner, monkeypatch):
    """A server answers a fetch with a message of its own making; jam prints it as a reason.
    Guard (mutation-checked): cli/common.report prints the stop reason as ``show_text(result.aborted)``."""
    import jam_core.cli.files as files
    from jam_core import hookimpl
    from jam_core.errors import RemoteError
    from jam_core.manager import make_plugin_manager

    make_file(tree.root / "a.bin", 100_000)
    assert invoke(runner, "stash", "a.bin").exit_code == 0

    class HostileServer:
        @hookimpl
        def fetch(self, remote, oid, dest, size, session):
            raise RemoteError(f"remote {remote.name!r}: server says \x1b]0;pwn\x07\x1b[2Jall fine")

    monkeypatch.setattr(files, "plugin_manager", lambda *a: make_plugin_manager(extra=(HostileServer(),)))
    res = invoke(runner, "checkout", "a.bin", color=True)
    assert res.exit_code == 1 and "server says" in res.stderr, (res.output, res.stderr)
    no_control(res.stderr)


def test_a_root_whose_path_holds_escapes_is_printed_escaped(tmp_path, runner, monkeypatch):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    top = tmp_path / "t\x1b]0;pwn\x07\x1b[2J"
    top.mkdir()
    (tmp_path / "remote").mkdir()
    res = invoke(runner, "init", str(top), color=True)
    assert res.exit_code == 0, res.output
    no_control(res.output)
    add_remote(Root.find(top), make_plugin_manager(), "vault", str(tmp_path / "remote"))
    monkeypatch.chdir(top)
    res = invoke(runner, "status", color=True)
    assert res.exit_code == 0 and "total" in res.output
    no_control(res.output)


def test_log_shows_a_hostile_commit_message_escaped(tree, runner, monkeypatch):
    """Snapshots travel between machines (`jam sync`): their message and host are data from
    elsewhere and must reach the terminal escaped, like names.
    Guard (mutation-checked): cli/history.log prints message and host through show_text.
    Guard (mutation-checked): cli.files init's and status's show_path of the root's path."""
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "host\x1b]0;pwn\x07")
    make_file(tree.root / "a.bin", 100_000)
    res = invoke(runner, "commit", "-m", "fine\x1b]0;pwn\x07\x1b[2J\rhidden")
    assert res.exit_code == 0, res.output
    res = invoke(runner, "log", color=True)
    assert res.exit_code == 0 and "fine" in res.output and "host" in res.output
    no_control(res.output)


# -- 2. bad input on the command line ------------------------------------------------------------

@pytest.mark.parametrize("args", [["stash", "--bogus", "a.bin"], ["status", "a.bin", "b.bin"],
                                  ["remote", "add", "only-a-name"], ["stahs", "a.bin"], ["--bogus"],
                                  ["remote", "add", "r", "/x", "--tier", "many"]],
                         ids=["unknown-option", "extra-arg", "missing-arg", "unknown-command", "top-option",
                              "bad-int"])
def test_a_usage_mistake_is_one_jam_line_exit_2(tree, args):
    """Guard (mutation-checked): JamGroup.parse_args/invoke turn click's UsageError into JamUsageError (cli/app.py)."""
    make_file(tree.root / "a.bin", 100_000)
    make_file(tree.root / "b.bin", 100_000)
    before = tree_state(tree.root)
    res = subprocess.run([JAM, *args], capture_output=True, text=True, cwd=tree.root, stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jam: "), res.stderr
    assert tree_state(tree.root) == before


@pytest.mark.parametrize("table,key,command", [
    ("core", "min_size", ["stash", "a.bin"]),
    ("policy.budget", "max_local", ["stash", "--auto", "--dry-run"]),
    ("history", "chunk_above", ["commit"]),
])
def test_a_size_too_big_for_any_disk_is_a_config_error(tree, runner, table, key, command):
    """Guard (mutation-checked): units.parse_size's ``size >= _SIZE_LIMIT`` check (an overflowing product is the limit)."""
    make_file(tree.root / "a.bin", 100_000)
    invoke(runner, "commit")  # a root in use: its first-use bookkeeping (catalog, root id) is done
    cfg = tree.root / ".jam" / "config.toml"
    text = cfg.read_text()
    if table == "core":
        text = text.replace('min_size = "64KiB"', 'min_size = "1e300GB"')
    else:
        text += f'\n[{table}]\n{key} = "1e300GB"\n'
    cfg.write_text(text)
    before = tree_state(tree.root)
    res = invoke(runner, *command)
    line = one_line(res)
    assert res.exit_code == 2 and key in line and "internal error" not in line and "plugin" not in line, line
    after = tree_state(tree.root)
    for state in (before, after):  # (.jam's own mtime: the catalog's journal comes and goes)
        del state[str(tree.root / ".jam")]
    assert after == before


@pytest.mark.parametrize("edit,key", [
    (('min_size = "64KiB"', "min_size = []"), "min_size"),
    (None, "copies"),
    (None, "depth"),
])
def test_doctor_reports_a_config_that_breaks_commands(tree, runner, edit, key):
    """Guard (mutation-checked): ops/doctor._config reads what commands read (root.min_size,
    placement.copies_of, hook settings...) and reports each UsageError as a problem."""
    cfg = tree.root / ".jam" / "config.toml"
    text = cfg.read_text()
    if key == "min_size":
        text = text.replace(*edit)
    elif key == "copies":
        text += "\n[place]\ncopies = 99\n"
    else:
        text += '\n[hook]\ndepth = "x"\n'
    cfg.write_text(text)
    res = invoke(runner, "doctor")
    assert "Traceback" not in res.output
    assert res.exit_code != 0 and key in (res.output + res.stderr), res.output


def test_a_negative_tier_is_refused_and_nothing_is_written(tree, runner, tmp_path):
    """Guard: add_remote's ``tier < 0`` check (jam_core/ops/remotes.py)."""
    (tmp_path / "other").mkdir()
    before = (tree.root / ".jam" / "config.toml").read_bytes()
    res = invoke(runner, "remote", "add", "r", str(tmp_path / "other"), "--tier", "-5")
    assert res.exit_code == 2 and "--tier" in one_line(res)
    assert (tree.root / ".jam" / "config.toml").read_bytes() == before
    assert os.listdir(tmp_path / "other") == []


def test_a_tier_beyond_any_toml_integer_is_refused(tree, runner, tmp_path):
    (tmp_path / "other").mkdir()
    before = (tree.root / ".jam" / "config.toml").read_bytes()
    res = invoke(runner, "remote", "add", "r", str(tmp_path / "other"), "--tier", "9" * 23)
    assert res.exit_code == 2 and "--tier" in one_line(res)
    assert (tree.root / ".jam" / "config.toml").read_bytes() == before


def test_an_infinite_duration_is_refused(tree, runner):
    """Guard (mutation-checked): units.parse_duration's ``seconds == inf`` check. Guard (mutation-checked): remotes.add_remote's MAX_TIER bound."""
    res = invoke(runner, "doctor", "--deep", "--older-than", "9" * 400 + "d")
    assert res.exit_code == 2
    assert "--older-than" in one_line(res)


@pytest.mark.parametrize("value", ["nan", "-nan"])
def test_a_daemon_timeout_that_is_not_a_number_is_refused(tree, runner, monkeypatch, value):
    """Guard (mutation-checked): cli/daemon.py's ``0 < timeout < inf`` check."""
    import jam_core.daemon.fanotify as fan
    import jam_core.daemon.supervisor as sup

    started = []

    class Fake:
        def __init__(self, roots, timeout):
            started.append(timeout)

        def run(self):
            pass

    monkeypatch.setattr(fan, "probe", lambda: None)  # as on a kernel that has it
    monkeypatch.setattr(sup, "Supervisor", Fake)
    res = invoke(runner, "daemon", "--timeout", value)
    assert started == [] and res.exit_code == 2, (started, res.output)
    assert "--timeout" in one_line(res)


# -- 3. config.toml and the environment ------------------------------------------------------

def test_a_user_config_that_is_a_fifo_is_one_line_not_a_hang(tree):
    """Guard (mutation-checked): root._read_toml's O_NONBLOCK open and read_capped's S_ISREG check."""
    cfg = tree.root.parent / "xdg-config" / "jam"
    cfg.mkdir(parents=True)
    os.mkfifo(cfg / "config.toml")
    env = dict(os.environ, XDG_CONFIG_HOME=str(cfg.parent))
    try:  # the bound is a hang detector only: the answer takes well under a second
        res = subprocess.run([JAM, "remote", "list"], capture_output=True, text=True, cwd=tree.root, env=env,
                             stdin=subprocess.DEVNULL, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("jam hung on a FIFO config")
    assert res.returncode == 2 and res.stderr.startswith("jam: ") and "config.toml" in res.stderr


def test_a_user_config_linked_to_dev_zero_is_one_line(tree):
    """Guard (mutation-checked): root.read_capped's S_ISREG check (and its CONFIG_MAX cap)."""
    cfg = tree.root.parent / "xdg-config" / "jam"
    cfg.mkdir(parents=True)
    os.symlink("/dev/zero", cfg / "config.toml")
    env = dict(os.environ, XDG_CONFIG_HOME=str(cfg.parent))

    def cap():  # what the machine would lose otherwise: all of its memory
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    res = subprocess.run([JAM, "remote", "list"], capture_output=True, text=True, cwd=tree.root, env=env,
                         stdin=subprocess.DEVNULL, preexec_fn=cap, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("jam: ") and "config.toml" in res.stderr and "internal error" not in res.stderr


def test_a_user_config_that_is_a_directory_is_a_config_error(tree, runner, monkeypatch):
    """Guard (mutation-checked): root.read_capped's S_ISREG check."""
    cfg = tree.root.parent / "xdg-config"
    (cfg / "jam" / "config.toml").mkdir(parents=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    res = invoke(runner, "remote", "list")
    assert res.exit_code == 2 and "config.toml" in one_line(res)


def test_relative_or_empty_xdg_dirs_are_ignored_as_the_spec_says(tmp_path, runner, monkeypatch, isolated_home):
    """Guard: root._xdg's ``os.path.isabs`` (a relative $XDG_DATA_HOME is ignored). Taken as
    is, ``XDG_DATA_HOME=rel`` would put the default remote under the cwd: inside the root."""
    top = tmp_path / "t"
    top.mkdir()
    monkeypatch.chdir(top)
    monkeypatch.setenv("XDG_DATA_HOME", "rel")
    monkeypatch.setenv("XDG_CONFIG_HOME", "")
    res = invoke(runner, "init")
    assert res.exit_code == 0, (res.output, res.stderr)
    assert sorted(os.listdir(top)) == [".jam"]
    assert str(isolated_home / ".local" / "share" / "jam" / "remotes" / "default") in res.output
    make_file(top / "a.bin", 100_000)
    assert invoke(runner, "stash", "a.bin").exit_code == 0
    assert sorted(os.listdir(top)) == [".jam", "a.bin"]


@pytest.mark.parametrize("how", ["remote-add", "through-a-symlink", "hand-edited"])
def test_two_remotes_at_one_location_are_never_two_copies(tree, runner, how):
    """`jam remote add b DIR` where DIR is already remote 'vault' (or a symlink to it, or the
    vault's table copied by hand in config.toml): either refused, or never counted as a second
    copy. Whatever copy/drop then say, the stub must come back with its bytes.
    Guard (mutation-checked): copies.remove_copies skips the other names of the store it removes
    from (hand-edited); remotes.add_remote refuses the second name (add, symlink)."""
    import blake3

    data = make_file(tree.root / "f.bin", 200_000, 7)
    assert invoke(runner, "stash", "f.bin").exit_code == 0
    if how == "hand-edited":
        from jam_core.root import Root

        root = Root.find(tree.root)
        root.update_config(lambda own: own["remote"].__setitem__("b", dict(own["remote"]["vault"])))
    else:
        where = str(tree.remote)
        if how == "through-a-symlink":
            os.symlink(tree.remote, tree.root.parent / "vault-link")
            where = str(tree.root.parent / "vault-link")
        res = invoke(runner, "remote", "add", "b", where)
        if res.exit_code != 0:  # refused: the safe answer
            assert res.exit_code == 2 and "vault" in one_line(res)
            return
    invoke(runner, "copy", "--to", "b", "f.bin")
    invoke(runner, "drop", "--from", "vault", "f.bin")
    res = invoke(runner, "checkout", "f.bin")
    assert res.exit_code == 0, (res.output, res.stderr)
    assert blake3.blake3((tree.root / "f.bin").read_bytes()).digest() == blake3.blake3(data).digest(), "differs"


def test_a_root_config_copied_as_user_defaults_never_shares_the_root_id(tree, runner, monkeypatch, isolated_home):
    """A user likes root A's config and copies it to ~/.config/jam/config.toml. Root B, made
    later, must still get its own id: otherwise B's refs on the shared remote replace A's and
    `jam gc` in B removes what A's stubs need."""
    import blake3

    data = make_file(tree.root / "a.bin", 100_000, 3)
    assert invoke(runner, "stash", "a.bin").exit_code == 0
    user_cfg = isolated_home / ".config" / "jam"
    user_cfg.mkdir(parents=True, exist_ok=True)
    (user_cfg / "config.toml").write_bytes((tree.root / ".jam" / "config.toml").read_bytes())
    b = tree.root.parent / "B"
    b.mkdir()
    assert invoke(runner, "init", str(b)).exit_code == 0
    monkeypatch.chdir(b)
    make_file(b / "b.bin", 100_000, 4)
    assert invoke(runner, "stash", "b.bin").exit_code == 0
    invoke(runner, "gc")
    monkeypatch.chdir(tree.root)
    res = invoke(runner, "checkout", "a.bin")
    assert res.exit_code == 0, (res.output, res.stderr)
    assert blake3.blake3((tree.root / "a.bin").read_bytes()).digest() == blake3.blake3(data).digest(), "differs"


@pytest.mark.parametrize("table,key", [("place", "copie"), ("core", "min_sise"), ("hook", "dept")])
def test_doctor_names_an_unknown_config_key(tree, runner, table, key):
    """Guard (mutation-checked): ops/doctor._config's KNOWN_KEYS check (a key jam does not read in
    a table it owns is a problem, with the known key it is likely a typo of)."""
    cfg = tree.root / ".jam" / "config.toml"
    cfg.write_text(cfg.read_text() + f"\n[{table}]\n{key} = 2\n" if table != "core"
                   else cfg.read_text().replace('min_size = "64KiB"', f'min_size = "64KiB"\n{key} = 2'))
    res = invoke(runner, "doctor")
    assert "Traceback" not in res.output
    assert key in res.output + res.stderr, res.output


def test_a_copied_root_never_lets_its_gc_remove_the_originals_objects(tree, runner, monkeypatch):
    import blake3

    make_file(tree.root / "a.bin", 100_000, 3)
    assert invoke(runner, "stash", "a.bin").exit_code == 0
    copy = tree.root.parent / "copy"
    subprocess.run(["cp", "-a", str(tree.root), str(copy)], check=True)  # a user backs the project up
    data = make_file(tree.root / "new.bin", 100_000, 5)
    assert invoke(runner, "stash", "new.bin").exit_code == 0
    monkeypatch.chdir(copy)
    make_file(copy / "c.bin", 100_000, 6)
    invoke(runner, "stash", "c.bin")
    invoke(runner, "gc")
    monkeypatch.chdir(tree.root)
    res = invoke(runner, "checkout", "new.bin")
    assert res.exit_code == 0, (res.output, res.stderr)
    assert blake3.blake3((tree.root / "new.bin").read_bytes()).digest() == blake3.blake3(data).digest(), "differs"


def test_init_refuses_a_root_around_a_remote_of_the_user_config(tmp_path, runner, isolated_home):
    top = tmp_path / "top"
    (top / "backup" / "objects").mkdir(parents=True)
    user_cfg = isolated_home / ".config" / "jam"
    user_cfg.mkdir(parents=True, exist_ok=True)
    (user_cfg / "config.toml").write_text(f'[remote.backup]\nkind = "dir"\nurl = "{top}/backup"\n'
                                          f'location = "{top}/backup"\ntier = 0\n')
    res = invoke(runner, "init", str(top))
    assert res.exit_code == 2 and "overlap" in one_line(res)
    assert sorted(os.listdir(top)) == ["backup"]


def test_a_root_path_with_a_newline_never_registers_another_directory(tmp_path, runner, isolated_home):
    """Guard (mutation-checked): Root.init's refusal of a path with a newline (register_root refuses one too). Guard (mutation-checked): root.check_root_overlaps reads the user config's dir remotes."""
    from jam_core.root import roots_file

    victim = tmp_path / "victim"
    victim.mkdir()
    top = tmp_path / f"evil\n{victim}"  # the directories "evil\n", then tmp_path's path under it
    top.mkdir(parents=True)
    res = invoke(runner, "init", str(top))
    if res.exit_code != 0:  # refused: fine, if said in one line and nothing registered
        assert res.exit_code == 2 and one_line(res)
        assert not roots_file().exists() or str(victim) not in roots_file().read_text()
        return
    lines = roots_file().read_text().splitlines()
    assert str(victim) not in lines, lines


def test_init_where_dot_jam_is_a_file_is_a_usage_error(tmp_path, runner):
    """Guard (mutation-checked): Root.init's lstat of .jam (not a directory: UsageError, exit 2)."""
    top = tmp_path / "t"
    top.mkdir()
    (top / ".jam").write_text("mine")
    res = invoke(runner, "init", str(top))
    line = one_line(res)
    assert res.exit_code == 2 and ".jam" in line and "not a directory" in line, line
    assert (top / ".jam").read_text() == "mine" and os.listdir(top) == [".jam"]


# -- 4. two commands at once -------------------------------------------------------------------

def test_a_command_waiting_for_the_lock_says_so_even_when_stderr_is_not_a_terminal(tree, runner, monkeypatch):
    """The lock is held by another process (an open file description of ours); at the instant
    stash is about to block on it, its stderr must already say why it waits.
    Guard (mutation-checked): Root.lock prints its waiting line (flushed) whatever stderr is."""
    import jam_core.root as rootmod

    make_file(tree.root / "a.bin", 100_000)
    holder = os.open(tree.root / ".jam" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    real = fcntl.flock
    said = []

    class Flock:
        def flock(self, fd, op):
            if fd != holder and op == fcntl.LOCK_EX:  # about to wait: what has the user been told?
                said.append(op)
                os.close(holder)  # the other process finishes
            return real(fd, op)

        def __getattr__(self, name):
            return getattr(fcntl, name)

    monkeypatch.setattr(rootmod, "fcntl", Flock())
    res = invoke(runner, "stash", "a.bin")
    assert res.exit_code == 0, res.output
    assert len(said) == 1
    assert "waiting for another jam process" in res.stderr


# -- 1b. the TUI: names and metadata are text, never markup ---------------------------------

SIZE = (80, 24)


async def _settle(pilot) -> None:
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def _rewrite_header(path, **changes) -> None:
    """Edit the metadata line of a stub's header block in place, leaving its stat as it was
    (mtime put back, the block was already there): a stub carried over from elsewhere."""
    from jam_core.stub import HEADER_MAX, MAGIC

    st = os.stat(path)
    with open(path, "r+b") as f:
        head = f.read(HEADER_MAX)
        start = head.index(b'{"jam":', len(MAGIC))
        end = head.index(b"\n", start)
        meta = json.loads(head[start:end])
        meta.update(changes)
        line = json.dumps(meta, separators=(",", ":")).encode()
        f.seek(start)
        f.write(line + b"\n")
        f.write(b"\0" * max(0, end - start - len(line)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_info_pane_shows_hostile_header_metadata_as_text(tree):
    """Guard (mutation-checked): InfoPane.show_details builds a rich.text.Text (pieces appended as text, never markup)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from jam_core.root import Root
    from jam_core.tui.app import make_app
    from jam_core.tui.widgets.info_pane import InfoPane
    from jam_core.tui.widgets.listing import Listing

    make_file(tree.root / "a.bin", 100_000)
    root = Root.find(tree.root)
    assert len(stash(root, ["a.bin"], make_plugin_manager()).done) == 1
    _rewrite_header(tree.root / "a.bin", stashed_at="[/x]", remotes=["vault", "[link=https://evil.example]y"])
    seen = {}

    async def go():
        app = make_app(root, ".", make_plugin_manager())
        async with app.run_test(size=SIZE) as pilot:
            await _settle(pilot)
            await pilot.press("slash", *"a.bin", "enter")
            await _settle(pilot)
            assert app.screen.query_one(Listing).current.name == "a.bin"
            await pilot.press("i")
            await _settle(pilot)
            rendered = app.screen.query_one(InfoPane).render()
            seen["text"] = getattr(rendered, "plain", str(rendered))
            await pilot.press("q")
        seen["code"] = app.return_code

    asyncio.run(go())
    assert seen.get("code") == 0
    assert "[/x]" in seen["text"] and "[link=https://evil.example]y" in seen["text"], seen


def test_a_notification_naming_a_markup_like_file_shows_it_as_text(tree):
    """Guard: JamApp.notify's ``markup=False`` default (jam_core/tui/app.py). The stub
    ``[/x].bin`` (file ``x].bin`` in directory ``[``) was written into: a fetch skips it and the
    notification names its path, which parsed as markup would crash the app (MarkupError)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from jam_core.root import Root
    from jam_core.tui.app import make_app
    from jam_core.tui.widgets.listing import Listing

    name = "[/x].bin"
    make_file(tree.root / name, 100_000)
    root = Root.find(tree.root)
    assert len(stash(root, [name], make_plugin_manager()).done) == 1
    with open(tree.root / name, "r+b") as f:
        f.seek(50_000)
        f.write(b"mine")
    seen = {}

    async def go():
        app = make_app(root, ".", make_plugin_manager())
        async with app.run_test(size=SIZE, notifications=True) as pilot:  # toasts drawn, as on a terminal
            await _settle(pilot)
            assert app.screen.query_one(Listing).current.name == "["  # the only entry
            await pilot.press("enter")
            await _settle(pilot)
            assert app.screen.query_one(Listing).current.name == "x].bin"
            await pilot.press("f")
            await _settle(pilot)
            seen["notices"] = list(app.notices)
            await pilot.press("q")
        seen["code"] = app.return_code

    asyncio.run(go())
    assert seen.get("code") == 0, seen
    assert any(name in text for _sev, text in seen["notices"]), seen


def test_a_listing_row_never_carries_a_terminal_escape(tree):
    """Guard: listing._printable (jam_core/tui/widgets/listing.py): a name with ESC, BEL, CR
    or a bidi override is drawn with each of them replaced, never sent to the terminal."""
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root
    from jam_core.tui.app import make_app
    from jam_core.tui.widgets.listing import Listing

    name = "e\x1b]0;pwn\x07\x1b[2J\r\u202egnp.exe"
    make_file(tree.root / name, 70_000)
    root = Root.find(tree.root)
    seen = {}

    async def go():
        app = make_app(root, ".", make_plugin_manager())
        async with app.run_test(size=SIZE) as pilot:
            await _settle(pilot)
            listing = app.screen.query_one(Listing)
            rows = [r for r in listing.view if r.name == name]
            assert len(rows) == 1
            seen["text"] = listing.row_text(rows[0], 80)
            await pilot.press("q")

    asyncio.run(go())
    assert seen["text"].lstrip().startswith("e")
    no_control(seen["text"])


def test_the_tui_says_why_an_action_waits_for_another_jam(tree, monkeypatch):
    """Another jam (here: our own open file description) holds the root's lock when `s` is
    pressed. At the instant the stash is about to block on the lock, the screen must already
    say that it waits for another jam process, not just 'stashing…'.
    Guard (mutation-checked): MainScreen._say_if_locked (a root.lock(wait=False) probe, then a notice)."""
    import threading

    import jam_core.root as rootmod
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root
    from jam_core.tui.app import make_app
    from jam_core.tui.widgets.listing import Listing

    make_file(tree.root / "a.bin", 100_000)
    root = Root.find(tree.root)
    holder = os.open(tree.root / ".jam" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    real = fcntl.flock
    blocking = threading.Event()
    release = threading.Event()

    class Flock:
        def flock(self, fd, op):
            if fd != holder and op == fcntl.LOCK_EX:  # the worker is about to wait for the holder
                blocking.set()
                release.wait(60)  # (bounded: a broken test never hangs the suite)
                os.close(holder)  # the other jam finishes
            return real(fd, op)

        def __getattr__(self, name):
            return getattr(fcntl, name)

    monkeypatch.setattr(rootmod, "fcntl", Flock())
    seen = {}

    async def go():
        app = make_app(root, ".", make_plugin_manager())
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await _settle(pilot)
            assert app.screen.query_one(Listing).current.name == "a.bin"
            await pilot.press("s")
            assert await asyncio.to_thread(blocking.wait, 60)
            for _ in range(3):
                await pilot.pause()
            seen["screen"] = " ".join(t for _s, t in app.notices) + " " + app.export_screenshot()
            release.set()
            await _settle(pilot)
            await pilot.press("q")

    try:
        asyncio.run(go())
    finally:
        release.set()
    assert "another jam" in seen["screen"], seen


@pytest.mark.parametrize("name", ["x\\", "a\\[b]"])
def test_info_pane_shows_a_name_with_backslashes_as_it_is(tree, name):
    """Guard (mutation-checked): InfoPane.show_details appends the name to a rich.text.Text (no markup, no escape)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root
    from jam_core.tui.app import make_app
    from jam_core.tui.widgets.info_pane import InfoPane
    from jam_core.tui.widgets.listing import Listing

    make_file(tree.root / name, 70_000)
    root = Root.find(tree.root)
    seen = {}

    async def go():
        app = make_app(root, ".", make_plugin_manager())
        async with app.run_test(size=SIZE) as pilot:
            await _settle(pilot)
            assert app.screen.query_one(Listing).current.name == name  # the only entry
            await pilot.press("i")
            await _settle(pilot)
            rendered = app.screen.query_one(InfoPane).render()
            seen["text"] = getattr(rendered, "plain", str(rendered))
            await pilot.press("q")

    asyncio.run(go())
    assert seen["text"].splitlines()[0] == name, seen


def test_the_tiers_screen_names_an_unplugged_remote_as_text(tmp_path, monkeypatch):
    """Guard (mutation-checked): TiersScreen.on_remote_checked's notify(..., markup=False)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root
    from jam_core.tui.app import make_app

    top = tmp_path / "root"
    top.mkdir()
    drive = tmp_path / "a[" / "x]"  # the location reads .../a[/x]
    drive.mkdir(parents=True)
    root, _ = Root.init(top)
    add_remote(root, make_plugin_manager(), "vault", str(drive))
    os.rename(tmp_path / "a[", tmp_path / "unplugged")  # the drive is gone
    monkeypatch.chdir(top)
    seen = {}

    async def go():
        app = make_app(root, ".", make_plugin_manager())
        async with app.run_test(size=SIZE, notifications=True) as pilot:  # toasts drawn, as on a terminal
            await _settle(pilot)
            await pilot.press("t")
            await _settle(pilot)
            seen["notices"] = list(app.notices)
            await pilot.press("q")
        seen["code"] = app.return_code

    asyncio.run(go())
    assert any("[/x]" in text for _s, text in seen.get("notices", [])), seen
    assert seen.get("code") == 0, seen

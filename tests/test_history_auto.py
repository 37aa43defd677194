"""Issue 15: automatic commits (`[history] auto`) from `jam daemon` and from the cd hook.

Real roots, the real `jam` command, real bash and zsh through a terminal (tests/test_shell_hooks.py's
Shell), the real daemon (tests/test_daemon.py's Daemon). A snapshot that is to appear is waited
for by polling `jam log --json` against a deadline, never by a bare sleep.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from jam_core.daemon import fanotify as F
from jam_core.history import auto
from tests.conftest import make_file
from tests.test_daemon import nobody_root  # noqa: F401  (a fixture)
from tests.test_shell_hooks import Shell, env, is_stub, jam_exe, logged, tree  # noqa: F401  (fixtures)

DEADLINE = 60.0


def set_auto(root, value) -> None:
    def change(own: dict) -> None:
        own.setdefault("history", {})["auto"] = value

    with root.lock():
        root.update_config(change)


def snapshots(jam_bin: str, path: Path, env: dict | None = None) -> list[dict]:
    res = subprocess.run([jam_bin, "log", "--json"], cwd=path, capture_output=True, text=True, env=env, timeout=120)
    if res.returncode == 2 and "no snapshot yet" in res.stderr:
        return []
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_for(what, check, deadline: float = DEADLINE, why=lambda: ""):
    """Poll ``check()`` until it returns something true; fail after ``deadline`` seconds
    (``why()`` says what was seen)."""
    end = time.monotonic() + deadline
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < end, f"{what}: not within {deadline:g} s {why()}"
        time.sleep(0.05)  # polling, not synchronisation: the deadline decides


def age_stamp(root, seconds: float = 3600) -> None:
    auto.stamp(root.jam_dir)
    then = time.time() - seconds
    os.utime(root.jam_dir / auto.STAMP, (then, then))


# -- jam commit --auto: the lock and the stamp ------------------------------------------------------
def test_a_second_automatic_commit_while_one_runs_does_nothing(jam_root, jam_bin):
    make_file(jam_root.path / "a.bin", 1000)
    set_auto(jam_root, "1s")
    with auto.hold(jam_root.jam_dir) as got:  # an automatic commit is running (the hook's, cron's)
        assert got
        res = subprocess.run([jam_bin, "commit", "--auto"], cwd=jam_root.path, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "another automatic commit" in res.stdout
        assert snapshots(jam_bin, jam_root.path) == []
        # a commit a person asks for is not an automatic one: it waits for nobody's auto lock
        res = subprocess.run([jam_bin, "commit", "-m", "mine"], cwd=jam_root.path, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert [s["message"] for s in snapshots(jam_bin, jam_root.path)] == ["mine"]


def test_every_commit_dates_the_stamp(jam_root, jam_bin):
    make_file(jam_root.path / "a.bin", 1000)
    age_stamp(jam_root)
    before = time.time() - 1
    res = subprocess.run([jam_bin, "commit"], cwd=jam_root.path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.stat(jam_root.jam_dir / auto.STAMP).st_mtime >= before


# -- the hook's part: kick ------------------------------------------------------------------------
@pytest.fixture
def spawned(monkeypatch):
    calls = []
    monkeypatch.setattr(auto, "spawn", lambda path, jam_dir, after_exit=True: calls.append(path) or 4242)
    return calls


def test_kick_starts_a_commit_only_when_due_and_none_runs(jam_root, spawned):
    assert auto.kick(jam_root) is None and spawned == []  # [history] auto not set
    set_auto(jam_root, "1h")
    jam_root._config = None
    auto.stamp(jam_root.jam_dir)
    assert auto.kick(jam_root) is None and spawned == []  # stamped just now: not due
    age_stamp(jam_root)
    with auto.hold(jam_root.jam_dir):
        assert auto.kick(jam_root) is None and spawned == []  # one is running
    assert auto.kick(jam_root) == 4242 and spawned == [str(jam_root.path)]
    assert auto.wait_left(jam_root.jam_dir, 3600) > 3000  # stamped at the start: retried one interval on
    assert auto.kick(jam_root) is None and len(spawned) == 1


@pytest.mark.parametrize("value", [5, "soon", {"x": 1}])
def test_kick_never_trips_the_hook_on_a_bad_setting(jam_root, spawned, value):
    set_auto(jam_root, value)
    jam_root._config = None
    assert auto.kick(jam_root) is None and spawned == []


def test_kick_never_stamps_through_a_symlink(jam_root, spawned, tmp_path):
    set_auto(jam_root, "1s")
    jam_root._config = None
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    old = victim.stat().st_mtime - 1000
    os.utime(victim, (old, old))
    os.symlink(victim, jam_root.jam_dir / auto.STAMP)
    os.utime(jam_root.jam_dir / auto.STAMP, (old, old), follow_symlinks=False)  # the link looks due
    assert auto.kick(jam_root) is None and spawned == []
    assert victim.stat().st_mtime == old


def test_the_detached_commit_starts_only_once_the_process_that_started_it_has_ended(jam_root, jam_bin):
    """So the hook's own fetch never waits for the root's lock behind the commit it started:
    the commit waits on a pipe only the starting process (and a background fetch it forks)
    holds open. Here this test's process is the starter; closing its ends stands for its end."""
    import fcntl

    make_file(jam_root.path / "a.bin", 1000)
    set_auto(jam_root, "1s")
    held = os.open(jam_root.jam_dir / "lock", os.O_RDWR | os.O_CREAT)  # the root's lock, held by the starter
    fcntl.flock(held, fcntl.LOCK_EX)
    pid = auto.spawn(str(jam_root.path), str(jam_root.jam_dir))
    assert pid
    try:
        _starts_after_its_starter(jam_root, jam_bin, pid, held)
    finally:
        while auto._GATE:
            os.close(auto._GATE.pop())
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pytest" in f.read():  # still this test's fork, left waiting by a failure
                    os.kill(pid, 9)
        except OSError:
            pass


def _starts_after_its_starter(jam_root, jam_bin, pid: int, held: int) -> None:
    import fcntl

    def waiting() -> bool:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                return "pipe_read" in f.read()
        except OSError:
            return False

    wait_for("the commit waiting for its starter's end", waiting)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"commit" not in f.read()  # not started yet
    assert os.getsid(pid) != os.getsid(0)  # a session of its own: Ctrl-C in the shell never reaches it
    # the waiting commit holds none of the starter's descriptors: a lock the starter lets go of
    # is free for it to take again (else it would wait for the commit that waits for it)
    os.close(held)
    again = os.open(jam_root.jam_dir / "lock", os.O_RDWR)
    try:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(again)
    assert snapshots(jam_bin, jam_root.path) == []
    while auto._GATE:
        os.close(auto._GATE.pop())  # this process "ends"
    rows = wait_for("the automatic commit", lambda: snapshots(jam_bin, jam_root.path))
    assert len(rows) == 1
    text = wait_for("the commit's log", lambda: (jam_root.jam_dir / auto.LOG).exists()
                    and (jam_root.jam_dir / auto.LOG).read_text())
    assert "committed" in text, text


# -- the cd hook in real shells ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bash", "zsh"])
def test_cd_with_a_due_automatic_commit_makes_a_snapshot_in_the_background(kind, tree, logged, jam_exe, env,
                                                                            tmp_path):
    root, _content = tree
    set_auto(root, "1s")
    age_stamp(root)
    assert snapshots(jam_exe, root.path) == []
    hook_bin, log = logged
    sh = Shell(kind, jam_exe, hook_bin, tmp_path, env)
    try:
        sh.run(f"cd {shlex.quote(str(root.path / 'data'))}")  # the prompt is back: the hook returned
        assert not is_stub(root.path / "data/a.bin")  # the fetch itself happened
        rows = wait_for("the automatic commit", lambda: snapshots(jam_exe, root.path))
        assert len(rows) == 1 and rows[0]["files"] >= 5
        assert "committed" in wait_for("its log", lambda: (root.jam_dir / auto.LOG).read_text()
                                       if (root.jam_dir / auto.LOG).exists() else "")
        # stamped: the next cd with stubs to fetch within the interval starts nothing new
        assert [c.split()[0] for c in log.read_text().splitlines()] == ["hook-fetch"]
    finally:
        sh.close()


# -- jam daemon ----------------------------------------------------------------------------------
_MISSING = F.probe()
needs_daemon = pytest.mark.skipif(_MISSING is not None, reason=f"no fanotify pre-content events here: {_MISSING}")


@needs_daemon
def test_the_daemon_commits_when_due_and_again_one_interval_later(jam_root, jam_bin):
    from tests.test_daemon import Daemon

    make_file(jam_root.path / "a.bin", 1000)
    set_auto(jam_root, "1s")
    d = Daemon(jam_bin, jam_root.path)
    try:
        wait_for("the first automatic commit", lambda: snapshots(jam_bin, jam_root.path), why=d.stderr)
        make_file(jam_root.path / "b.bin", 1000, seed=2)
        rows = wait_for("the second one", lambda: len(snapshots(jam_bin, jam_root.path)) >= 2
                        and snapshots(jam_bin, jam_root.path))
        assert rows[0]["added"] == 1
    finally:
        assert d.stop() == 0
    assert "automatic commit failed" not in d.stderr()


@needs_daemon
def test_a_failing_automatic_commit_is_logged_in_one_line_and_tried_again(jam_root, jam_bin):
    from tests.test_daemon import Daemon

    def change(own: dict) -> None:
        own.pop("remote", None)  # no remote: `jam commit` refuses
        own["history"] = {"auto": "1s"}

    with jam_root.lock():
        jam_root.update_config(change)
    d = Daemon(jam_bin, jam_root.path)
    try:
        lines = wait_for("two failures logged", lambda: [ln for ln in d.stderr().splitlines()
                                                         if "automatic commit failed" in ln][1:] and
                         [ln for ln in d.stderr().splitlines() if "automatic commit failed" in ln])
        assert all("has no remote" in ln and str(jam_root.path) in ln for ln in lines), lines
        assert "Traceback" not in d.stderr()
    finally:
        assert d.stop() == 0


@pytest.fixture
def python_for_all():
    """The commit runs as the user with nothing of root's (no capability kept, unlike
    test_daemon's `run`): the interpreter must be reachable by anyone, as a system's is. Here it
    may live under a 0700 /root: that directory is made searchable (x, not r) for the test."""
    import sys

    changed = []
    p = Path(sys.executable).resolve()
    for d in p.parents:
        mode = d.stat().st_mode
        if not mode & 0o001:
            os.chmod(d, mode | 0o001)
            changed.append((d, mode))
    try:
        yield
    finally:
        for d, mode in changed:
            os.chmod(d, mode & 0o7777)


@needs_daemon
def test_the_daemon_commits_a_users_root_as_that_user(nobody_root, jam_bin, monkeypatch, python_for_all):
    """The daemon runs as root; the root belongs to `nobody`: the commit runs as nobody, so
    everything it makes in .jam is nobody's (a symlink nobody plants there leads root nowhere)."""
    from tests.test_daemon import Daemon

    base, path, run_as, nobody = nobody_root
    run_as(jam_bin, "init", ".")
    make_file(path / "mine.bin", 1000)
    os.chown(path / "mine.bin", nobody.pw_uid, nobody.pw_gid)
    cfg = path / ".jam/config.toml"
    cfg.write_text(cfg.read_text() + '\n[history]\nauto = "1s"\n')
    monkeypatch.setenv("JAM_MACHINE_ID", "nobodys-box")  # nobody's HOME is not writable
    d = Daemon(jam_bin, path)
    try:
        wait_for("the automatic commit", lambda: _nobody_log(run_as, jam_bin), why=d.stderr)
    finally:
        assert d.stop() == 0
    made = [*(path / ".jam/history").rglob("*"), path / ".jam" / auto.STAMP, path / ".jam" / auto.LOCK]
    wrong = [(str(p), os.stat(p, follow_symlinks=False).st_uid) for p in made
             if os.stat(p, follow_symlinks=False).st_uid != nobody.pw_uid]
    assert len(made) > 3 and not wrong, wrong


def _nobody_log(run_as, jam_bin) -> list:
    try:
        return json.loads(run_as(jam_bin, "log", "--json").stdout)
    except AssertionError as exc:  # no snapshot yet
        assert "no snapshot yet" in str(exc), exc
        return []


def test_a_commit_that_ended_is_reaped_even_if_something_it_started_keeps_its_output_open(tmp_path, capsys):
    """The daemon waits for a commit's output to close; a process the commit left behind
    (holding that pipe) must not make the root look busy forever: the ended commit is reaped,
    its failure logged, the root due again."""
    from jam_core.daemon.supervisor import Supervisor

    sup = Supervisor([tmp_path])
    left = tmp_path / "left-behind.pid"
    proc = subprocess.Popen(["sh", "-c", f"echo 'jam: it broke'; sleep 300 & echo $! > {shlex.quote(str(left))}; "
                             "exit 3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        sup.auto_runs[fd] = (tmp_path, proc, bytearray())
        sup.auto_next[tmp_path] = time.monotonic() + 3600
        proc.wait()  # the commit ended; its `sleep` still holds the pipe
        assert sup.auto_wait() is not None  # the loop wakes to look
        sup.auto_tick(time.monotonic())
        assert sup.auto_runs == {}
        err = capsys.readouterr().err
        assert "automatic commit failed (exit 3): jam: it broke" in err and len(err.splitlines()) == 1
    finally:
        proc.wait()
        if left.exists():
            os.kill(int(left.read_text()), 9)  # the sleep this test started

"""Automatic commits: ``[history] auto = "10m"`` in a root's config.toml.

Three things start ``jam commit --auto`` (which itself commits only when the interval has passed
since the last snapshot): cron or a systemd timer, ``jam daemon`` (a timer per root in its
supervisor, the commit run as the root's owner) and the cd hook's ``jam hook-fetch`` (:func:`kick`).

Files in ``ROOT/.jam``:

* ``auto-commit.stamp``: its mtime is when an automatic commit was last started here or any
  commit last ended. The hook looks at nothing else (one ``stat``, no catalog or history
  query): not due -> it costs that stat. A start stamps it first, so a commit that fails is
  tried again one interval later, not at every ``cd``.
* ``auto-commit.lock``: an flock the running ``jam commit --auto`` holds (:func:`hold`): never
  two automatic commits of one root at once, whoever started them; a second one says so and
  does nothing. (The commit also takes the root's lock for its work, like every writer.)
* ``auto-commit.log``: what the last commit the hook started printed.

This module is on the hook's path: it imports only what that path has loaded already.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

STAMP = "auto-commit.stamp"
LOCK = "auto-commit.lock"
LOG = "auto-commit.log"

# The command line of the commit. ``-P``: the root (the child's cwd) never goes on sys.path, so a
# ``click.py`` synced into the tree is never imported. The code starts with "jam_core" so that
# ``jam daemon`` knows the process as jam's own (daemon.marks.is_jam_pid): the scan reads stub
# headers and must not hydrate them.
CODE = "jam_core = __import__('jam_core.cli').cli; jam_core.main()"


def command() -> list[str]:
    return [sys.executable, "-P", "-c", CODE, "commit", "--auto", "-m", "auto"]


def interval(root, config: dict | None = None) -> float | None:
    """``[history] auto`` in seconds, None if it is not set (UsageError if it is not a duration).
    ``config``: instead of the root's merged config (the daemon, reading a user's root, reads
    only ``ROOT/.jam/config.toml``: the user defaults it could find are its own user's)."""
    from jam_core.errors import UsageError
    from jam_core.units import parse_duration

    table = (root.config if config is None else config).get("history", {})
    if not isinstance(table, dict):
        raise UsageError(f"{root.config_path}: 'history' must be a table")
    value = table.get("auto")
    if value is None or value is False:
        return None
    return parse_duration(value, f"{root.config_path}: [history] auto")


def wait_left(jam_dir, every: float, now: float | None = None) -> float:
    """Seconds until an automatic commit is due (0: due now) by the stamp's mtime. A stamp
    from the future (the clock went back) counts as due."""
    try:
        st = os.stat(os.path.join(jam_dir, STAMP), follow_symlinks=False)
    except OSError:
        return 0.0
    now = time.time() if now is None else now
    since = now - st.st_mtime
    if since < 0 or since >= every:
        return 0.0
    return every - since


def stamp(jam_dir) -> None:
    """Date the stamp now (made if missing; never through a symlink)."""
    fd = os.open(os.path.join(jam_dir, STAMP), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, 0o644)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def _lock_fd(jam_dir) -> int:
    return os.open(os.path.join(jam_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                   | os.O_CLOEXEC, 0o644)


class hold:
    """``with hold(jam_dir) as got:`` the automatic-commit lock, without waiting; ``got`` is
    False when another automatic commit holds it."""

    def __init__(self, jam_dir):
        self.jam_dir = jam_dir
        self.fd = -1

    def __enter__(self) -> bool:
        self.fd = _lock_fd(self.jam_dir)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            return False
        return True

    def __exit__(self, *exc) -> bool:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1
        return False


def running(jam_dir) -> bool:
    """An automatic commit of this root runs now (holds the lock)."""
    with hold(jam_dir) as got:
        return not got


def kick(root) -> int | None:
    """The cd hook's part: if ``[history] auto`` is set and due, start ``jam commit --auto``
    detached (its own session, stdin /dev/null, output to ``.jam/auto-commit.log``) and return
    its pid; else None. Never raises and never waits for the commit: a bad ``[history] auto``
    is for ``jam commit --auto`` to report, not for the hook's fetch to trip on. Only for the
    owner of the root's ``.jam``: another user's shell (``sudo -s`` keeping HOME) would leave
    the history's files to that user, and the owner's commits would fail."""
    try:
        if os.stat(root.jam_dir).st_uid != os.geteuid():
            return None
        every = interval(root)
        if every is None or wait_left(root.jam_dir, every) > 0:
            return None
        if running(root.jam_dir):
            return None
        stamp(root.jam_dir)
        return spawn(str(root.path), str(root.jam_dir))
    except Exception:  # noqa: BLE001  (the hook's fetch goes on whatever happens here)
        return None


_GATE: list[int] = []  # write ends of the gates of the commits this process started (open until it ends)


def spawn(root_path: str, jam_dir: str, after_exit: bool = True) -> int | None:
    """Start the commit in the background, detached (double fork: no zombie, no controlling
    terminal, Ctrl-C in the shell never reaches it). Returns the commit's pid.

    ``after_exit``: the commit starts only once this process (and a background fetch it forks)
    has ended: it waits for the end of a pipe whose write end only they hold. So the hook's own
    fetch never waits for the root's lock behind the commit it started."""
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC) if after_exit else (-1, -1)
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        try:
            os.close(r)
            os.setsid()
            grandchild = os.fork()
            if grandchild:
                os.write(w, str(grandchild).encode())
                os._exit(0)
            os.close(w)  # else the caller would wait for this one to end
            if gate_w >= 0:
                os.close(gate_w)  # else it would wait for itself
            # nothing of the caller's stays open while it waits: no terminal or pipe of the
            # shell's, no descriptor holding a lock the caller may take again
            if gate_r > 3:
                os.closerange(3, gate_r)
            os.closerange(max(gate_r, 2) + 1, os.sysconf("SC_OPEN_MAX"))
            null = os.open(os.devnull, os.O_RDONLY)
            if null != 0:
                os.dup2(null, 0)
                os.close(null)
            log = os.open(os.path.join(jam_dir, LOG), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            for n in (1, 2):
                if log != n:
                    os.dup2(log, n)
            if log > 2:
                os.close(log)
            if gate_r >= 0:
                while os.read(gate_r, 1):  # EOF: the process that started it has ended
                    pass
                os.close(gate_r)
            os.chdir(root_path)
            env = {k: v for k, v in os.environ.items() if k not in ("JAM_DEBUG_MODULES", "JAM_BACKGROUND")}
            if "PYTHONPATH" in env:  # an empty or relative entry would mean the root (the cwd): absolute ones only
                env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if os.path.isabs(p))
            argv = command()
            os.execve(argv[0], argv, env)
        except BaseException:  # noqa: BLE001
            pass
        os._exit(127)
    os.close(w)
    if gate_r >= 0:
        os.close(gate_r)
        _GATE.append(gate_w)
    try:
        data = b""
        while chunk := os.read(r, 32):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return int(data) if data.isdigit() else None

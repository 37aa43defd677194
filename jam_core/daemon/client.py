"""Talking to a running ``jam daemon``: its socket and pid file in ``ROOT/.jam/``.

``mark_new_stub`` is what stash calls right before a new stub is renamed into place, so that
the stub is marked (and fills in on first open) from its first instant under its name. It does
nothing when no daemon serves the root (no socket), and costs one connect when one does.
"""

from __future__ import annotations

import errno
import fcntl
import os

SOCK_NAME = "daemon.sock"
PID_FILE = "daemon.pid"
TIMEOUT = 10.0  # seconds to wait for the daemon's answer


def mark_new_stub(root_path, dir_fd: int, name: str) -> bool:
    """Ask the daemon serving ``root_path`` to mark the stub ``name`` in ``dir_fd`` (opened
    without following a symlink). True once marked; False if no daemon serves the root or it
    refused (the stub then fills in when the daemon is next started, or with ``jam checkout``)."""
    sp = os.path.join(os.fspath(root_path), ".jam", SOCK_NAME)
    if not os.path.exists(sp):
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    import socket  # here: stash imports this module, and most roots have no daemon

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(TIMEOUT)
            s.connect(sp)
            socket.send_fds(s, [b"mark"], [fd])
            return s.recv(256) == b"ok"
    except OSError:
        return False  # a dead daemon's socket, no permission, a timeout: the stub is made anyway
    finally:
        os.close(fd)


def status(root_path) -> tuple[bool, str]:
    """(active, one line): whether a ``jam daemon`` serves this root now (its pid file is locked
    by a live process and its socket is there)."""
    jd = os.path.join(os.fspath(root_path), ".jam")
    try:
        fd = os.open(os.path.join(jd, PID_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False, "no `jam daemon` serves this root"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not os.path.exists(os.path.join(jd, SOCK_NAME)):
                return False, f"a `jam daemon` (pid {pid}) holds this root but its socket is missing"
            return True, f"`jam daemon` (pid {pid}) fills stubs in when any program opens them"
        return False, "no `jam daemon` serves this root (a stopped daemon's pid file is left)"
    finally:
        os.close(fd)


def wait_idle(root_path, timeout: float = 60.0) -> bool:
    """Wait until the daemon serving ``root_path`` has nothing queued or in progress: every
    reader answered, every fill made durable, every recorded open written to the catalog and
    the cd hook's index updated. False if no daemon answers within ``timeout`` (benchmarks and
    tests look only after this)."""
    import socket

    sp = os.path.join(os.fspath(root_path), ".jam", SOCK_NAME)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(sp)
            s.send(b"idle")
            return s.recv(16) == b"idle"
    except OSError:
        return False

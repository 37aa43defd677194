"""Durability helpers shared by the core and backends."""

from __future__ import annotations

import os

_libc = None


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | os.PathLike) -> None:
    """Make everything written to the filesystem holding ``path`` durable (Linux syncfs(2)).

    One syncfs after a batch replaces an fsync per file and per directory: it flushes the
    data, the inodes and the renames of the whole batch at once.
    """
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


# -- temporary names on remotes ------------------------------------------------------------
# A backend uploads to ``tmp/<part_name()>`` and renames into ``objects/``. A part is provably
# stale, and may be removed by any jam, when the jam that wrote it is dead on this machine, or
# when it is older than any transfer could take (another machine's jam, which we cannot ask).

PART_SUFFIX = ".part"
PART_MAX_AGE = 7 * 24 * 3600  # seconds: no single object upload takes a week


def _host() -> str:
    import socket

    return "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:64] or "host"


def part_name() -> str:
    """A temporary object name that says who wrote it: ``<host>.<pid>.<random>.part``."""
    import uuid

    return f"{_host()}.{os.getpid()}.{uuid.uuid4().hex[:16]}{PART_SUFFIX}"


def part_is_stale(name: str, mtime: float, now: float) -> bool:
    """True if ``tmp/name`` on a remote is an upload no living jam is still writing.

    Only names jam makes qualify (``part_name()``, or the bare ``<hex>.part`` of older
    versions). Ours from a dead process on this host: stale at once; anything else: when
    older than PART_MAX_AGE.
    """
    if not name.endswith(PART_SUFFIX):
        return False
    fields = name[: -len(PART_SUFFIX)].split(".")
    if len(fields) == 3 and fields[1].isdigit() and fields[0] == _host():
        pid = int(fields[1])
        if pid != os.getpid() and not _alive(pid):
            return True
    elif not (len(fields) in (1, 3) and all(f and all(c.isalnum() or c in "-_" for c in f) for f in fields)):
        return False
    return now - mtime > PART_MAX_AGE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

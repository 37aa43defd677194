"""What the daemon marks, and whose opens it lets through without a fetch."""

from __future__ import annotations

import errno
import os

from jam_core.daemon import fanotify as F
from jam_core.stub import XATTR, may_be_stub

# On each stub inode: any open (read, write, exec) and any read or page fault of a file opened
# while it was marked. ``cp`` of a sparse file may never read it (SEEK_HOLE): its open is caught.
STUB_MASK = F.FAN_OPEN_PERM | F.FAN_OPEN_EXEC_PERM | F.FAN_PRE_ACCESS
# On each directory of a root (use recording, a notification group): opens of its children.
USE_MASK = F.FAN_OPEN | F.FAN_EVENT_ON_CHILD
# On each directory of a root (a fid group): directories made in it or moved into it, so that
# they are marked for use too while the daemon runs.
NEW_DIR_MASK = F.FAN_CREATE | F.FAN_MOVED_TO | F.FAN_ONDIR


def is_stub_path(path: str, st: os.stat_result) -> bool:
    """A cheap check: the file may be a stub (stat) and carries ``user.jam``."""
    if not may_be_stub(st):
        return False
    try:
        os.getxattr(path, XATTR, follow_symlinks=False)
    except OSError:
        return False
    return True


def mark_stubs(fan_fd: int, root_path: str, on_error=None) -> int:
    """Mark every stub under ``root_path`` (the one walk: never through a symlink, ``.jam``,
    nested roots and remotes skipped). Returns how many were marked."""
    from jam_core.scan import scan_dirs

    n = 0
    for _dname, files in scan_dirs(root_path, ".", on_error, ordered=False):
        for _name, path, st in files:
            if not is_stub_path(path, st):
                continue
            try:
                F.mark(fan_fd, F.FAN_MARK_ADD | F.FAN_MARK_DONT_FOLLOW, STUB_MASK, -100, path)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):
                    continue  # gone since it was listed
                raise
            n += 1
    return n


def mark_fd(fan_fd: int, fd: int) -> None:
    """Mark the stub open at ``fd`` (stash's new stubs, sent over the daemon's socket)."""
    F.mark(fan_fd, F.FAN_MARK_ADD, STUB_MASK, fd, None)


def unmark_fd(fan_fd: int, fd: int) -> None:
    try:
        F.mark(fan_fd, F.FAN_MARK_REMOVE, STUB_MASK, fd, None)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # not marked (any more)
            raise


def mark_dirs(fan_fd: int, top: str, mask: int = USE_MASK, is_root: bool = True) -> int:
    """Mark ``top`` and every directory below it (never through a symlink; a root's ``.jam``
    skipped when ``top`` is the root) with ``mask``. Returns how many."""
    n = 0
    for dirpath, dirnames, _files in os.walk(top, followlinks=False):
        if is_root and dirpath == top:
            dirnames[:] = [d for d in dirnames if d != ".jam"]
        try:
            F.mark(fan_fd, F.FAN_MARK_ADD | F.FAN_MARK_DONT_FOLLOW | F.FAN_MARK_ONLYDIR, mask, -100, dirpath)
        except OSError:
            continue
        n += 1
    return n


def is_jam_pid(pid: int) -> bool:
    """The process ``pid`` runs jam (its command line names the ``jam`` script or jam_core).

    jam's own scans (status, doctor, checkout's checks) read stub headers and must not hydrate
    what they only look at; a process that pretends to be jam gets a stub's header, nothing
    more (no fetch, and no content it could not read anyway)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return False
    for arg in argv[:3]:
        base = arg.rsplit(b"/", 1)[-1]
        if base == b"jam" or arg.startswith(b"jam_core") or b"/jam_core/" in arg:
            return True
    return False


class AsOwner:
    """``with AsOwner(root_path):`` this thread's filesystem identity (setfsuid/setfsgid, which
    Linux keeps per thread) is the root's owner's, so that what a daemon running as root creates
    or opens in a user's ``.jam`` (the catalog and its journal files, the socket, the pid
    file, the index) is the user's and is reached with the user's rights alone: a symlink the
    user planted there leads nowhere the user could not write to anyway. Nothing changes for a
    root owned by the daemon's own user."""

    _libc = None

    def __init__(self, root_path):
        st = os.stat(root_path, follow_symlinks=False)
        self.uid, self.gid = st.st_uid, st.st_gid
        self.switch = os.geteuid() == 0 and self.uid != 0

    @classmethod
    def _c(cls):
        if cls._libc is None:
            import ctypes

            cls._libc = ctypes.CDLL(None, use_errno=True)
        return cls._libc

    def __enter__(self):
        if self.switch:
            c = self._c()
            c.setfsgid(self.gid)
            c.setfsuid(self.uid)
            if c.setfsuid(-1) != self.uid:  # setfsuid reports no error: check what it is now
                raise OSError(errno.EPERM, "cannot take the root owner's filesystem identity")
        return self

    def __exit__(self, *exc):
        if self.switch:
            c = self._c()
            c.setfsuid(0)
            c.setfsgid(0)
        return False

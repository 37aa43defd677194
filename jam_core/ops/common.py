"""What the operations share: the result of one, and the walk of the paths a user named."""

from __future__ import annotations

import os
import stat
from typing import Iterable

from jam_core.fs import DirFds, ThroughSymlink
from jam_core.root import Root
from jam_core.scan import Entry, walk


class Result:
    """What an operation did, file by file. ``done`` holds (path, bytes) pairs. A plain class
    (not a dataclass: its decoration cost the cd hook's fetch ~3 M instructions), with the
    same constructor, equality and repr."""

    __slots__ = ("done", "skipped", "failed", "unchanged", "aborted", "partly")

    def __init__(self, done: list[tuple[str, int]] | None = None, skipped: list[tuple[str, str]] | None = None,
                 failed: list[tuple[str, str]] | None = None, unchanged: int = 0, aborted: str = "",
                 partly: bool = False):
        self.done = [] if done is None else done
        self.skipped = [] if skipped is None else skipped
        self.failed = [] if failed is None else failed
        self.unchanged = unchanged  # already in the wanted state
        self.aborted = aborted  # why the run stopped early (e.g. a remote is gone)
        self.partly = partly  # a file was left undone for a reason the user must act on

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        return self._fields() == other._fields() if type(other) is Result else NotImplemented

    __hash__ = None  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return "Result(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.done)

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.aborted or self.partly) else 0


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def collect(root: Root, dirs: DirFds, rels: Iterable[str], result: Result) -> list[tuple[Entry, bool]]:
    """Walk the named paths; returns (entry, named_explicitly) pairs, each file once.

    Each named path is looked at relative to its directory's descriptor: a path reached
    through a symlink, a symlink, or anything but a regular file or directory is skipped with
    its reason. The caller holds the root's lock, so temporary files a killed jam provably
    left are removed on the way (see ``scan.scan_dirs``)."""
    seen: set[str] = set()
    cleaned: set[str] = set()  # the directories whose leftovers are gone: each listed once, not per file named
    out = []
    for rel in rels:
        parent, _, name = rel.rpartition("/")
        try:
            if rel == ".":
                st = os.fstat(dirs.root_fd)
            else:
                st = os.stat(name, dir_fd=dirs.get(parent or "."), follow_symlinks=False)
        except ThroughSymlink as exc:
            result.skipped.append((rel, f"reached through the symlink {exc.filename}: jam does not follow symlinks"))
            continue
        except FileNotFoundError:
            result.failed.append((rel, "no such file or directory"))
            continue
        except OSError as exc:
            result.failed.append((rel, exc.strerror or str(exc)))
            continue
        if stat.S_ISLNK(st.st_mode):
            result.skipped.append((rel, "a symlink: jam does not stash or follow symlinks"))
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            result.skipped.append((rel, f"{kind}: jam works only on regular files"))
            continue

        def on_error(r, exc):
            result.failed.append((r, exc.strerror or str(exc)))

        clean = True
        if stat.S_ISREG(st.st_mode):  # its directory is listed for leftovers once, however many of its files are named
            clean = (parent or ".") not in cleaned
            cleaned.add(parent or ".")
        for e in walk(str(root.path), rel, on_error, clean=clean):
            if e.rel not in seen:
                seen.add(e.rel)
                out.append((e, e.rel == rel))
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP while files are being swapped: raised like a Ctrl-C, so that what is
    in the middle of an exchange is put back before jam ends (the CLI says "interrupted")."""


class ends_as_interrupt:
    """``with ends_as_interrupt():`` a SIGTERM or SIGHUP (a timeout, systemd, a closed
    terminal) raises ``Terminated`` instead of killing the process outright between an
    exchange and its check. Only in the main thread, and only for a signal nobody else
    handles (its handler is the default); the handlers are put back on leaving."""

    SIGNALS = ("SIGTERM", "SIGHUP")

    def __enter__(self):
        import signal
        import threading

        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None or signal.getsignal(sig) is not signal.SIG_DFL:
                continue
            try:
                self._old[sig] = signal.signal(sig, _terminated)
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass


def _terminated(signum, frame):
    raise Terminated(signum)

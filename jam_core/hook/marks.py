"""Visits the cd hooks record without starting a process: ``ROOT/.jam/visits/``.

On every ``cd`` into a directory of a root (``JAM_DISABLE`` unset), the hook truncates or
creates an empty file in ``ROOT/.jam/visits/`` named after the directory, whose mtime is then
the time of the visit: ``: >|"$marks/$name"`` in bash and zsh, ``true >$marks/$name`` in fish.
A builtin redirection starts no process and needs no clock in the shell (fish has none); the
filesystem dates the visit to the nanosecond. It is bounded by design: one empty file per
directory visited since the last fold, however often it was visited.

A mark's name is the directory's path from the root with a leading ``/`` (the root itself is
``/``), percent-encoded: bash and zsh write ``%`` as ``%25`` and ``/`` as ``%2F`` and leave every
other byte as it is (newlines and non-UTF-8 bytes included: a file name can hold them); fish
writes ``string escape --style=url`` and then ``/`` as ``%2F``. One percent-decoding reads both
back exactly. A name longer than NAME_MAX (255 bytes) cannot be created, so a visit to such a
deep directory is not recorded by the shell (``jam hook-fetch`` still records its own visits).

:func:`fold` turns the marks into the catalog's ``uses``: each visited directory's files
(within ``hook.depth``, the scope a fetch on that visit would have) count as used at the mark's
mtime, never moving a newer use back. It runs under the root's lock when policies plan and on
``jam hook-fetch``. Marks are metadata, so input: a name that does not decode to a directory
inside the root (``..``, ``.jam``, a symlink leading out, junk), a mark that is not a regular
file, or a time more than a day ahead is dropped without effect.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from urllib.parse import unquote_to_bytes

from jam_core.fs import DIR_FLAGS
from jam_core.root import CATALOG, JAM_DIR, Root
from jam_core.units import LazyRe

MARKS = "visits"
FOLDING = "visits.folding"  # marks being folded (moved here first, so no visit is lost)
AHEAD = 86400  # a mark dated further ahead than this is junk, not a visit
_BAD_ESCAPE = LazyRe(rb"%(?![0-9A-Fa-f]{2})")


def marks_dir(root: Root) -> str:
    return os.path.join(root.path, JAM_DIR, MARKS)


_warned: set[str] = set()


def _warn(path: str, why: str) -> None:
    """Say once per process that a directory of marks is ignored, and why."""
    if path not in _warned:
        import sys

        _warned.add(path)
        fix = f"chmod 700 {path}" if "mode" in why else "remove it and jam makes it again"
        print(f"jam: {path} {why}; cd visits are not recorded there ({fix})", file=sys.stderr)


def _open_own(jam_fd: int, name: str, path: str, create: bool = False) -> int | None:
    """A descriptor on ``ROOT/.jam/<name>`` if it is a real directory (not a symlink) owned by
    us and not writable by group or others; None (with a warning, once) if it is anything else,
    None silently if it is missing. ``create`` makes it first (0700)."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=jam_fd)
        except OSError:
            pass  # it exists, or the root is read-only: no marks then
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=jam_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _warn(path, "is not a directory (a symlink or a file)")
        return None
    st = os.fstat(fd)
    why = None
    if st.st_uid != os.geteuid():
        why = f"belongs to uid {st.st_uid}, not to you"
    elif st.st_mode & 0o022:
        why = f"can be written by others (mode {stat.S_IMODE(st.st_mode):o}, expected 700)"
    if why:
        os.close(fd)
        _warn(path, why)
        return None
    return fd


def _open_jam(root: Root) -> int | None:
    try:
        return os.open(os.path.join(root.path, JAM_DIR), DIR_FLAGS)
    except OSError:
        return None


def ensure(root: Root) -> None:
    """Create ``ROOT/.jam/visits/`` (0700; the hooks write marks only where it exists)."""
    jam = _open_jam(root)
    if jam is None:
        return
    try:
        fd = _open_own(jam, MARKS, marks_dir(root), create=True)
        if fd is not None:
            os.close(fd)
    finally:
        os.close(jam)


def encode(rel: str) -> bytes:
    """The mark name the bash and zsh hooks write for ``rel`` ("." is the root)."""
    raw = b"/" if rel == "." else b"/" + os.fsencode(rel)
    return raw.replace(b"%", b"%25").replace(b"/", b"%2F")


def decode(name: bytes) -> str | None:
    """The relative path ("." for the root) a mark's name stands for, or None for junk."""
    if not name.startswith(b"%2F") or _BAD_ESCAPE.search(name):
        return None
    raw = unquote_to_bytes(name)
    if b"\0" in raw:
        return None
    parts = raw[1:].split(b"/") if raw != b"/" else []
    if any(p in (b"", b".", b"..") for p in parts) or parts[:1] == [JAM_DIR.encode()]:
        return None
    return os.fsdecode(b"/".join(parts)) if parts else "."


def _resolve(root: Root, rel: str) -> str | None:
    """``rel`` as a real directory of the root (symlinks resolved), or None if it leads out,
    into ``.jam`` or nowhere."""
    top = os.path.realpath(root.path)
    real = os.path.realpath(root.abs(rel))
    if real != top and not real.startswith(top.rstrip("/") + "/"):
        return None
    out = os.path.relpath(real, top)
    if out.split("/", 1)[0] == JAM_DIR or not os.path.isdir(real):
        return None
    return out


def pending(root: Root) -> bool:
    """True if there are marks to fold (one scandir; no lock). Never through a symlink."""
    jam = _open_jam(root)
    if jam is None:
        return False
    try:
        for name in (MARKS, FOLDING):
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=jam)
            except OSError:
                continue
            try:
                if os.listdir(fd):
                    return True
            finally:
                os.close(fd)
    finally:
        os.close(jam)
    return False


def fold(root: Root, now: float | None = None, recorded: set[str] | None = None) -> int:
    """Fold the marks into the catalog's uses and remove them; returns the number of
    directories recorded (and adds them, relative to the root, to ``recorded`` if given).
    Takes the root's lock without waiting: when another jam holds it, or the root is
    read-only, the marks stay for the next fold."""
    from jam_core.errors import UsageError

    ensure(root)
    if not pending(root):
        return 0
    try:
        with root.lock(wait=False):
            return _fold(root, time.time() if now is None else now, recorded)
    except (UsageError, OSError):
        return 0


def _fold(root: Root, now: float, recorded: set[str] | None = None) -> int:
    """Under the lock. Every step goes through descriptors of ``.jam``, ``visits`` and
    ``visits.folding``, opened without following a symlink and checked to be ours: a mark is
    moved, read (lstat) and removed, never opened or followed. The marks are removed only once
    their uses are committed: an interrupted fold leaves them in ``visits.folding``, and the
    next fold reads them again (a use recorded twice is the same use)."""
    jam = _open_jam(root)
    if jam is None:
        return 0
    try:
        marks = _open_own(jam, MARKS, marks_dir(root))
        if marks is None:
            return 0
        try:
            folding = _open_own(jam, FOLDING, os.path.join(root.path, JAM_DIR, FOLDING), create=True)
            if folding is None:
                return 0
            try:
                visits, read = _collect(root, marks, folding, now)
                n = _record(root, visits, recorded)
                for name, st in read:
                    _remove(name, folding, st)
            finally:
                os.close(folding)
            try:
                os.rmdir(FOLDING, dir_fd=jam)
            except OSError:
                pass
        finally:
            os.close(marks)
    finally:
        os.close(jam)
    return n


def _collect(root: Root, marks: int, folding: int, now: float) -> tuple[dict[str, float], list]:
    # Move each mark aside, then read its time: a shell that opened it before the move has
    # already dated it; one that comes after makes a new mark for the next fold.
    try:
        names = os.listdir(marks)
    except OSError:
        names = []
    for name in names:
        try:
            os.rename(name, name, src_dir_fd=marks, dst_dir_fd=folding)
        except OSError:
            pass
    visits: dict[str, float] = {}
    read = []  # (name, lstat) of every entry looked at: removed once the uses are recorded
    for name in os.listdir(folding):
        try:
            st = os.lstat(name, dir_fd=folding)
        except OSError:
            continue
        rel = decode(os.fsencode(name))
        if rel is not None and stat.S_ISREG(st.st_mode) and 0 < st.st_mtime <= now + AHEAD:
            rel = _resolve(root, rel)
            if rel is not None:
                visits[rel] = max(visits.get(rel, 0.0), st.st_mtime)
        read.append((name, st))
    return visits, read


def _record(root: Root, visits: dict[str, float], recorded: set[str] | None = None) -> int:
    from jam_core.catalog import Catalog
    from jam_core.errors import UsageError
    from jam_core.hook.settings import HookSettings, settings
    from jam_core.hook.visit import plan

    if not visits:
        return 0
    try:
        hs = settings(root)
    except UsageError:
        hs = HookSettings()
    with Catalog(root.jam_dir / CATALOG) as cat, cat.transaction():
        for rel, when in sorted(visits.items()):
            cat.record_use(plan(root, rel, hs).files, when)
    if recorded is not None:
        recorded.update(visits)
    return len(visits)


def _remove(name: str, dir_fd: int, st: os.stat_result) -> None:
    try:
        if stat.S_ISDIR(st.st_mode):
            from jam_core.fs import remove_tree

            remove_tree(name, dir_fd)  # junk; fd-based, never follows a symlink out
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass

"""A directory visit from the cd hook: what to fetch there, within ``hook.depth`` and
``hook.max_fetch``, and the visit recorded as use for the LRU policy.

The shell decides without Python whether a visit has anything to fetch (``jam_core.hook.index``);
this runs only when it has.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from jam_core.hook.settings import HookSettings
from jam_core.root import JAM_DIR, Root
from jam_core.scan import DIRTY, STUB, classify, is_jam_tmp


@dataclass
class Visit:
    """The visit's scope: its stubs (relative paths and sizes) and every regular file in it."""

    rel: str
    stubs: list[tuple[str, int]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dirty: int = 0

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.stubs)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC = os.path.isdir("/proc/self/fd")


def _open_rel(top: int, rel: str) -> int:
    """A descriptor on the directory ``rel`` below ``top``, each component opened with
    O_NOFOLLOW|O_DIRECTORY: a symlink anywhere on the way is an error, never followed."""
    fd = os.dup(top)
    for part in [] if rel == "." else rel.split("/"):
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def plan(root: Root, rel: str, hs: HookSettings) -> Visit:
    """Scan ``rel`` and up to ``hs.depth`` levels below it (never ``.jam``, never symlinks:
    every directory is opened relative to the root's descriptor without following one)."""
    from jam_core.root import valid_rel

    p = Visit(rel)
    if rel != "." and not valid_rel(rel):
        return p
    try:
        top = os.open(root.path, _DIR_FLAGS)
    except OSError:
        return p
    try:
        stack = [(rel, 0)]
        while stack:
            d, level = stack.pop()
            try:
                fd = _open_rel(top, d)
            except OSError:
                continue  # gone, or swapped for a symlink since it was listed
            try:
                _plan_dir(p, fd, d, str(root.abs(d)), level, hs, stack)
            finally:
                os.close(fd)
    finally:
        os.close(top)
    return p


def _plan_dir(p: Visit, fd: int, d: str, where: str, level: int, hs: HookSettings, stack: list) -> None:
    try:
        names = sorted(os.listdir(fd))
    except OSError:
        return
    prefix = "" if d == "." else d + "/"
    for name in names:
        if not prefix and name == JAM_DIR:
            continue
        try:
            st = os.lstat(name, dir_fd=fd)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if hs.depth is None or level < hs.depth:
                stack.append((prefix + name, level + 1))
        elif stat.S_ISREG(st.st_mode) and not is_jam_tmp(name):
            # The file through this directory's descriptor: no symlink on the way is followed.
            path = f"/proc/self/fd/{fd}/{name}" if _PROC else os.path.join(where, name)
            state, rec, _ = classify(path, st)
            p.files.append(prefix + name)
            if state == STUB:
                p.stubs.append((prefix + name, rec.size))
            elif state == DIRTY:
                p.dirty += 1


def record_visit(root: Root, p: Visit) -> None:
    """The visit counts as a use of every file in its scope (for the LRU policy)."""
    from jam_core.catalog import Catalog
    from jam_core.root import CATALOG

    if not p.files:
        return
    with Catalog(root.jam_dir / CATALOG) as cat:
        with cat.transaction():
            cat.record_use(p.files)

"""A directory visit from the cd hook: what to fetch there, within ``hook.depth`` and
``hook.max_fetch``, and the visit recorded as use for the LRU policy.

The shell decides without Python whether a visit has anything to fetch (``jam_core.stubdirs``);
this runs only when it has.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from jam_core.root import JAM_DIR, Root
from jam_core.scan import DIRTY, STUB, classify, is_jam_tmp
from jam_core.stubdirs import HookSettings


@dataclass
class Plan:
    """The visit's scope: its stubs (relative paths and sizes) and every regular file in it."""

    rel: str
    stubs: list[tuple[str, int]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dirty: int = 0

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.stubs)


def plan(root: Root, rel: str, hs: HookSettings) -> Plan:
    """Scan ``rel`` and up to ``hs.depth`` levels below it (never ``.jam``, never symlinks)."""
    p = Plan(rel)
    stack = [(rel, 0)]
    while stack:
        d, level = stack.pop()
        path = root.abs(d)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        prefix = "" if d == "." else d + "/"
        for e in entries:
            if not prefix and e.name == JAM_DIR:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if hs.depth is None or level < hs.depth:
                    stack.append((prefix + e.name, level + 1))
            elif stat.S_ISREG(st.st_mode) and not is_jam_tmp(e.name):
                state, rec, _ = classify(e.path, st)
                p.files.append(prefix + e.name)
                if state == STUB:
                    p.stubs.append((prefix + e.name, rec.size))
                elif state == DIRTY:
                    p.dirty += 1
    return p


def record_visit(root: Root, p: Plan) -> None:
    """The visit counts as a use of every file in its scope (for the LRU policy)."""
    from jam_core.catalog import Catalog
    from jam_core.root import CATALOG

    if not p.files:
        return
    with Catalog(root.jam_dir / CATALOG) as cat:
        with cat.transaction():
            cat.record_use(p.files)

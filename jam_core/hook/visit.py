"""A directory visit from the cd hook: what to fetch there, within ``hook.depth`` and
``hook.max_fetch``, and the visit recorded as use for the LRU policy.

The shell decides without Python whether a visit has anything to fetch (``jam_core.hook.index``);
this runs only when it has.
"""

from __future__ import annotations

from jam_core.hook.settings import HookSettings
from jam_core.root import Root
from jam_core.scan import DIRTY, STUB, classify, scan_dirs


class Visit:
    """The visit's scope: its stubs (relative paths and sizes) and every regular file in it."""

    __slots__ = ("rel", "stubs", "files", "dirty")

    def __init__(self, rel: str, stubs: list[tuple[str, int]] | None = None, files: list[str] | None = None,
                 dirty: int = 0):
        self.rel = rel
        self.stubs = [] if stubs is None else stubs
        self.files = [] if files is None else files
        self.dirty = dirty

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.stubs)

    def __repr__(self) -> str:
        return f"Visit({self.rel!r}, {len(self.stubs)} stubs, {len(self.files)} files, dirty={self.dirty})"


def plan(root: Root, rel: str, hs: HookSettings) -> Visit:
    """Scan ``rel`` and up to ``hs.depth`` levels below it with the one walk (scan.scan_dirs:
    never ``.jam``, never a symlink, every directory opened by descriptor)."""
    from jam_core.root import valid_rel

    p = Visit(rel)
    if rel != "." and not valid_rel(rel):
        return p
    for d, files in scan_dirs(str(root.path), rel, depth=hs.depth):
        prefix = "" if d == "." else d + "/"
        for name, path, st in files:
            state, rec, _ = classify(path, st)
            p.files.append(prefix + name)
            if state == STUB:
                p.stubs.append((prefix + name, rec.size))
            elif state == DIRTY:
                p.dirty += 1
    return p


def record_visit(root: Root, p: Visit) -> None:
    """The visit counts as a use of every file in its scope (for the LRU policy)."""
    from jam_core.catalog import Catalog
    from jam_core.root import CATALOG

    if not p.files:
        return
    with Catalog(root.jam_dir / CATALOG) as cat:
        with cat.transaction():
            cat.record_use(p.files)

"""The records every policy sees: one scan of a root into a plain :class:`FileRecord` per file.

``last_used`` is the newest of atime (unless ``[policy] use_atime = false``), mtime and jam's
own record of use (the catalog's uses, and the cd hooks' visits folded into them). Files that
must never leave are set aside with the reason: pinned, ignored by ``ROOT/.jamignore``
(gitignore syntax), hard-linked, dirty or unreadable stubs, empty or smaller than
``core.min_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from jam_core.errors import UsageError
from jam_core.model import FileRecord
from jam_core.policy.pins import covered, read_pins
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, QUICK, STUB, classify, scan_dirs

IGNORE_FILE = ".jamignore"


@dataclass
class Inventory:
    """One scan of a root, split into what policies may choose and what they may not."""

    candidates: dict[str, FileRecord] = field(default_factory=dict)  # local files policies may stash
    stubs: dict[str, FileRecord] = field(default_factory=dict)  # clean stubs (for fetch)
    kept: dict[str, str] = field(default_factory=dict)  # path -> why policies may not have it
    local_bytes: int = 0  # true size of every file that is not a stub
    problems: list[tuple[str, str]] = field(default_factory=list)

    def kept_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for why in self.kept.values():
            out[why] = out.get(why, 0) + 1
        return out


def load_ignore(root: Root):
    """The ``ROOT/.jamignore`` matcher (gitignore syntax), or None if there is no such file."""
    path = root.path / IGNORE_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None
    import pathspec

    try:
        return pathspec.GitIgnoreSpec.from_lines(text.splitlines())
    except Exception as exc:  # pathspec raises several kinds for a bad pattern
        raise UsageError(f"{path}: bad pattern: {exc}") from None


def use_atime(config: Mapping[str, Any]) -> bool:
    policy = config.get("policy")
    value = policy.get("use_atime", True) if isinstance(policy, Mapping) else True
    if not isinstance(value, bool):
        raise UsageError(f"policy.use_atime: expected true or false, got {value!r}")
    return value


def inventory(root: Root) -> Inventory:
    """One scan of the root plus the catalog's uses and pins: the records policies see."""
    from jam_core.catalog import Catalog
    from jam_core.hook.marks import fold

    fold(root)  # the cd hooks' visits become uses first
    config = root.config
    min_size = root.min_size
    atime_ok = use_atime(config)
    ignore = load_ignore(root)
    pins = read_pins(root)
    with Catalog(root.jam_dir / CATALOG) as cat:
        uses = cat.uses()
    inv = Inventory()

    def on_error(rel, exc):
        inv.problems.append((rel, exc.strerror or str(exc)))

    # One pass of lstat()s; an xattr is read only where the stat suggests a stub (a writable,
    # non-sparse file is taken as local). ``stash`` re-classifies every file it is handed
    # thoroughly before touching it, so a stub made writable again is still never stashed.
    for d, files in scan_dirs(str(root.path), ".", on_error, ordered=False):
        prefix = "" if d == "." else d + "/"
        dir_pinned = covered(d, pins)
        for name, path, st in files:
            rel = prefix + name
            state, srec, _ = classify(path, st, QUICK)
            mtime = st.st_mtime
            atime = st.st_atime
            last = max(mtime, atime if atime_ok else mtime, uses.get(rel, 0.0))
            pinned = dir_pinned or (pins and rel in pins)
            ignored = ignore is not None and ignore.match_file(rel)
            if state == STUB:
                if not pinned and not ignored:
                    inv.stubs[rel] = FileRecord(rel, srec.size, mtime, atime, last, STUB, False, st.st_nlink)
                continue
            size = st.st_size
            inv.local_bytes += size
            if pinned or ignored or state != LOCAL or st.st_nlink != 1 or size < min_size or size == 0:
                inv.kept[rel] = _kept(state, st, pinned, ignored, min_size)
                continue
            inv.candidates[rel] = FileRecord(rel, size, mtime, atime, last, LOCAL, False, 1)
    return inv


def _kept(state: str, st: os.stat_result, pinned: bool, ignored: bool, min_size: int) -> str:
    """Why a non-stub file may not be chosen by a policy ("" if it may)."""
    if pinned:
        return "pinned"
    if state == DIRTY:
        return "modified stub"
    if state == BAD:
        return "unreadable stub"
    if state != LOCAL:
        return state
    if ignored:
        return "ignored (.jamignore)"
    if st.st_nlink > 1:
        return "hard-linked"
    if st.st_size == 0 or st.st_size < min_size:
        return "smaller than core.min_size"
    return ""


class Records(tuple):
    """The records a policy is offered (a plain tuple to any plugin), carrying the rest of the
    tree a share needs: ``stubs``, the clean stubs policies could have chosen had they been
    local (pinned and ignored ones excluded). A share of "the tree" must count them, or it
    shrinks with every run (``jam_lru``)."""

    stubs: tuple[FileRecord, ...] = ()

"""The index the shell hooks read: which directories of a root have stubs to fetch on `cd`.

``ROOT/.jam/stubdirs/`` mirrors the root's directories that matter: the mirror of a directory
carries the sticky bit when a ``cd`` into it has something to fetch (stubs in it, or up to
``hook.depth`` levels below it); directories without the bit only lead to deeper ones. A hook
decides with one ``stat`` and no process (``[[ -k $ROOT/.jam/stubdirs${PWD#$ROOT} ]]``), in
constant time however many directories hold stubs, with no parsing, no cache to invalidate and
no escaping (names with newlines or undecodable bytes are just names).

The index is derived from the catalog's stub table and rebuilt by :func:`refresh` at the end of
every stash and checkout (under the root's lock). It is never the truth: a stale entry costs one
``jam hook-fetch`` that finds nothing and refreshes it. Its mtime records the last refresh; a
``config.toml`` newer than it (a changed ``hook.depth``) makes the hook ask jam once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterable

from jam_core.errors import UsageError
from jam_core.root import JAM_DIR, Root, parse_size

INDEX = "stubdirs"
MARK = stat.S_ISVTX  # the sticky bit: "cd here fetches"
DEFAULT_DEPTH = 0
DEFAULT_MAX_FETCH = "1GB"


@dataclass(frozen=True)
class HookSettings:
    """``[hook]`` in a root's config.toml. ``depth`` None means unlimited."""

    depth: int | None = DEFAULT_DEPTH
    max_fetch: int = parse_size(DEFAULT_MAX_FETCH)
    background: bool = False


def settings(root: Root) -> HookSettings:
    """The root's ``[hook]`` table, validated (UsageError names the bad key)."""
    table = root.config.get("hook", {})
    where = f"{root.config_path}: [hook]"
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table")
    depth = table.get("depth", DEFAULT_DEPTH)
    if depth in ("all", -1):
        depth = None
    elif not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise UsageError(f"{where} depth: expected a whole number >= 0 or \"all\", got {depth!r}")
    max_fetch = parse_size(table.get("max_fetch", DEFAULT_MAX_FETCH), f"{where} max_fetch")
    background = table.get("background", False)
    if not isinstance(background, bool):
        raise UsageError(f"{where} background: expected true or false, got {background!r}")
    return HookSettings(depth, max_fetch, background)


def index_path(root: Root) -> str:
    return os.path.join(root.path, JAM_DIR, INDEX)


def wanted(stub_paths: Iterable[str], depth: int | None) -> set[str]:
    """Directories (relative, "" = the root) where a cd has stubs within ``depth`` levels."""
    direct = {os.path.dirname(p) for p in stub_paths}
    out = set()
    for d in direct:
        parts = d.split("/") if d else []
        keep = len(parts) + 1 if depth is None else min(depth, len(parts)) + 1
        for n in range(len(parts), len(parts) - keep, -1):
            out.add("/".join(parts[:n]))
    return out


def refresh(root: Root, cat=None) -> None:
    """Make the index match the catalog's stubs and the current ``hook.depth``.

    Cheap when nothing changed (one query, a walk of the small mirror tree, no writes but the
    stamp). Errors in the config fall back to the defaults: the index must never block a stash.
    """
    try:
        depth = settings(root).depth
    except UsageError:
        depth = DEFAULT_DEPTH
    if cat is None:
        from jam_core.catalog import Catalog
        from jam_core.root import CATALOG

        with Catalog(root.jam_dir / CATALOG) as c:
            stubs = c.stubs()
    else:
        stubs = cat.stubs()
    sync(index_path(root), wanted(stubs, depth))


def sync(base: str, marked: set[str]) -> None:
    """Make the mirror tree under ``base`` carry the mark exactly on ``marked``."""
    have: dict[str, bool] = {}  # rel -> marked, for every mirror dir that exists
    if os.path.isdir(base):
        for dirpath, dirnames, _files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            rel = "" if rel == "." else rel
            have[rel] = bool(os.lstat(dirpath).st_mode & MARK)
    else:
        if not marked:
            return  # a root that never had stubs needs no index
        os.mkdir(base, 0o755)
        have[""] = False
    # Mark first (parents before children), then unmark, then remove what leads nowhere.
    for rel in sorted(marked):
        path = os.path.join(base, rel) if rel else base
        if rel not in have:
            os.makedirs(path, 0o755, exist_ok=True)
        if not have.get(rel):
            os.chmod(path, 0o755 | MARK)
    needed = set()
    for rel in marked:
        while rel:
            needed.add(rel)
            rel = os.path.dirname(rel)
    for rel in sorted(have, key=len, reverse=True):  # children before parents
        path = os.path.join(base, rel) if rel else base
        if have[rel] and rel not in marked:
            os.chmod(path, 0o755)
        if rel and rel not in needed:
            try:
                os.rmdir(path)
            except OSError:
                pass
    os.utime(base)  # the stamp a hook compares config.toml against

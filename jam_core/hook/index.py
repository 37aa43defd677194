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

import errno
import os
import stat
from typing import Iterable

from jam_core.errors import UsageError
from jam_core.fs import DIR_FLAGS, remove_tree, walk_dirs
from jam_core.hook.settings import DEFAULT_DEPTH, settings
from jam_core.root import CONFIG, JAM_DIR, Root, valid_rel

INDEX = "stubdirs"
MARK = stat.S_ISVTX  # the sticky bit: "cd here fetches"
def index_path(root: Root) -> str:
    return os.path.join(root.path, JAM_DIR, INDEX)


def wanted(stub_paths: Iterable[str], depth: int | None) -> set[str]:
    """Directories (relative, "" = the root) where a cd has stubs within ``depth`` levels.
    Paths that are not valid relative paths (``../x``, ``/etc/x``, ``.jam/x``) are ignored."""
    direct = {os.path.dirname(p) for p in stub_paths if valid_rel(p)}
    out = set()
    for d in direct:
        parts = d.split("/") if d else []
        keep = len(parts) + 1 if depth is None else min(depth, len(parts)) + 1
        for n in range(len(parts), len(parts) - keep, -1):
            out.add("/".join(parts[:n]))
    return out


_warned = False


def refresh(root: Root, cat=None, leave_out: set[str] = frozenset()) -> None:
    """Make the index match the catalog's stubs (but ``leave_out``) and the current ``hook.depth``.

    Cheap when nothing changed (one query, a walk of the small mirror tree, no writes but the
    stamp). Errors in the config fall back to the defaults, and an index that cannot be
    written is said once on stderr: the index must never block a stash.
    """
    global _warned
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
    if leave_out:
        stubs = [p for p in stubs if p not in leave_out]
    try:
        sync(index_path(root), wanted(stubs, depth))
    except OSError as exc:
        if not _warned:
            import sys

            _warned = True
            print(f"jam: the cd hook's index {index_path(root)} was not updated: "
                  f"{exc.strerror or exc}", file=sys.stderr)




def _open_dir(name: str, dir_fd: int | None, create: bool = False) -> int:
    """Open the directory ``name`` (relative to ``dir_fd``) without following a symlink.
    With ``create``, make it (0755) when missing, and replace whatever else has its name (a
    symlink, a file planted in jam's own index) by a new directory."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    except (NotADirectoryError, OSError) as exc:
        if not create or exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=dir_fd)  # a symlink or file in the index: never follow it
    os.mkdir(name, 0o755, dir_fd=dir_fd)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _remove(name: str, dir_fd: int) -> None:
    """Remove an entry of the index that leads nowhere, never following a symlink."""
    st = os.lstat(name, dir_fd=dir_fd)
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(name, dir_fd=dir_fd)  # the common case (a directory fetched whole): a leaf
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        remove_tree(name, dir_fd)  # fd-based: never follows a symlink out
    else:
        os.unlink(name, dir_fd=dir_fd)


def sync(base: str, marked: set[str]) -> None:
    """Make the mirror tree under ``base`` carry the mark exactly on ``marked``.

    Every directory is opened with O_NOFOLLOW|O_DIRECTORY relative to its parent's descriptor,
    from ``base``'s parent (``ROOT/.jam``) down, and changed only through that descriptor: a
    symlink planted anywhere in the index is removed, never followed. Paths in ``marked``
    that are not valid relative paths are ignored.
    """
    marked = {m for m in marked if m == "" or valid_rel(m)}
    tree: dict = {}  # name -> subtree, for every directory the index needs
    for rel in marked:
        node = tree
        for part in rel.split("/") if rel else []:
            node = node.setdefault(part, {})
    parent = os.open(os.path.dirname(base), DIR_FLAGS)
    try:
        try:
            top = _open_dir(os.path.basename(base), parent, create=bool(marked))
        except FileNotFoundError:
            return  # a root that never had stubs needs no index
        # Depth first, holding only the chain of directories from the top to the current one.
        stack: list = []
        try:
            stack.append((top, _enter(top, "", tree, marked)))
            while stack:
                fd, children = stack[-1]
                nxt = next(children, None)
                if nxt is None:
                    stack.pop()
                    if stack:
                        os.close(fd)
                    continue
                name, rel, child = nxt
                cfd = _open_dir(name, fd, create=True)
                try:
                    stack.append((cfd, _enter(cfd, rel, child, marked)))
                except BaseException:
                    os.close(cfd)
                    raise
            _stamp(top, parent)
        finally:
            for fd, _ in stack[1:]:
                os.close(fd)
            os.close(top)
    finally:
        os.close(parent)


def _stamp(top: int, jam_fd: int) -> None:
    """Date the index (``top``) now, the stamp a hook compares config.toml against; never
    older than config.toml (``jam_fd``: ROOT/.jam): one dated in the future (a clock ahead,
    a backup restored) would otherwise stay newer and make every cd start jam until then."""
    import time

    t = time.time_ns()
    try:
        t = max(t, os.stat(CONFIG, dir_fd=jam_fd, follow_symlinks=False).st_mtime_ns)
    except OSError:
        pass
    os.utime(top, ns=(t, t))


def _enter(fd: int, rel: str, node: dict, marked: set[str]):
    """Fix one directory of the index (its mark, entries it does not need); returns an
    iterator over the children it needs: ``(name, rel, subtree)``."""
    mode = 0o755 | (MARK if rel in marked else 0)
    if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
        os.fchmod(fd, mode)
    for name in set(os.listdir(fd)) - node.keys():
        _remove(name, fd)
    return iter([(name, f"{rel}/{name}" if rel else name, child) for name, child in sorted(node.items())])


def clear_filled(root: Root, cat) -> None:
    """Clear the mark of indexed directories that have no stubs to fetch any more (``jam
    daemon``, after it filled stubs in place). Only changes the mode of directories already in
    the index, each through a descriptor (``fs.walk_dirs``, never following a symlink); never
    creates or removes one, so an index owned by the root's user stays its own when a daemon
    running as root updates it."""
    try:
        depth = settings(root).depth
    except UsageError:
        depth = DEFAULT_DEPTH
    keep = wanted(cat.stubs(), depth)
    base = index_path(root)
    if not os.path.isdir(base):
        return
    top = os.open(base, DIR_FLAGS)
    try:
        for rel, dfd in walk_dirs(top):
            mode = stat.S_IMODE(os.fstat(dfd).st_mode)
            if mode & MARK and rel not in keep:
                os.fchmod(dfd, mode & ~MARK)
    finally:
        os.close(top)

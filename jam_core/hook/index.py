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


CHANGED_MOST = 4096  # more files changed than this: the whole index is rebuilt (one query of every row)
STALE = "stubdirs.stale"  # in ROOT/.jam while a stash or checkout may change stubs the index does not show yet


def begin(root: Root) -> bool:
    """Before a stash or checkout changes stubs (under the root's lock): mark the index as
    possibly behind the catalog until ``refresh`` has followed it. True if the mark was there
    already: a run killed before its refresh left the index behind, so the next refresh must
    be a whole one (a run that changes only a few files would otherwise set only their marks)."""
    jam = os.path.join(root.path, JAM_DIR)
    try:
        os.close(os.open(os.path.join(jam, STALE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600))
        return False
    except FileExistsError:
        return True
    except OSError:
        return True  # cannot be marked (a read-only .jam): the whole index at the end


def _followed(root: Root) -> None:
    """The index follows the catalog again: the mark of ``begin`` goes."""
    try:
        os.unlink(os.path.join(root.path, JAM_DIR, STALE))
    except OSError:
        pass


def refresh(root: Root, cat=None, leave_out: set[str] = frozenset(), changed: list[str] | None = None) -> None:
    """Make the index match the catalog's stubs (but ``leave_out``) and the current ``hook.depth``.

    Cheap when nothing changed (one query, a walk of the small mirror tree, no writes but the
    stamp). ``changed`` (the files a stash or checkout just made stubs or brought back, at
    most CHANGED_MOST): only the marks those can move are set again, each from one indexed
    query of the catalog, so fetching three stubs of a root of a million costs no read of the
    other rows (the whole index is rebuilt when it is missing or older than config.toml, whose
    hook.depth it follows). Errors in the config fall back to the defaults, and an index that
    cannot be written is said once on stderr: the index must never block a stash.
    """
    global _warned
    try:
        depth = settings(root).depth
    except UsageError:
        depth = DEFAULT_DEPTH
    if changed is not None and cat is not None and not leave_out and len(changed) <= CHANGED_MOST:
        try:
            if _refresh_some(root, cat, changed, depth):
                _followed(root)
                return
        except OSError:
            pass  # the whole index, below
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
        if not leave_out:
            _followed(root)
    except OSError as exc:
        if not _warned:
            import sys

            _warned = True
            print(f"jam: the cd hook's index {index_path(root)} was not updated: "
                  f"{exc.strerror or exc}", file=sys.stderr)




def _refresh_some(root: Root, cat, changed: list[str], depth: int | None) -> bool:
    """Set again the marks the files ``changed`` can move (their directories, and the ones up
    to ``depth`` levels above): a mark stays where the catalog still has a stub within depth
    below it. Directories left unmarked stay in the mirror (the next whole rebuild removes
    them; a hook only reads the mark). False when the whole index must be rebuilt instead (it
    is missing, or older than config.toml)."""
    base = index_path(root)
    jam = os.open(os.path.dirname(base), DIR_FLAGS)
    try:
        try:
            top = os.open(os.path.basename(base), DIR_FLAGS, dir_fd=jam)
        except OSError:
            return False
        try:
            if os.fstat(top).st_mtime_ns < os.stat(CONFIG, dir_fd=jam, follow_symlinks=False).st_mtime_ns:
                return False  # hook.depth may have changed: every mark is decided again
        except OSError:
            pass
        try:
            dirs = wanted([p for p in changed if valid_rel(p)], depth)
            for d in sorted(dirs):
                _set_mark(top, d, cat.has_stub_within(d, depth))
            _stamp(top, jam)
        finally:
            os.close(top)
    finally:
        os.close(jam)
    return True


def _set_mark(top: int, d: str, marked: bool) -> None:
    """The mirror of ``d`` (made, with its parents, when it is to be marked; never through a
    symlink) carries the mark or not; unmarked, it goes if it is empty, and so do the
    unmarked parents it leaves empty (the common case, a directory fetched whole: a leaf)."""
    parts = d.split("/") if d else []
    chain = [os.dup(top)]  # the descriptors from the top down to d's mirror
    try:
        for part in parts:
            try:
                chain.append(_open_dir(part, chain[-1], create=marked))
            except FileNotFoundError:
                return  # not in the mirror and not to be marked: nothing to clear
        mode = 0o755 | (MARK if marked else 0)
        if stat.S_IMODE(os.fstat(chain[-1]).st_mode) != mode:
            os.fchmod(chain[-1], mode)
        if not marked:
            for i in range(len(parts), 0, -1):
                if i < len(parts) and os.fstat(chain[i]).st_mode & MARK:
                    break  # a parent still marked stays
                try:
                    os.rmdir(parts[i - 1], dir_fd=chain[i - 1])  # only an empty one goes
                except OSError:
                    break
    finally:
        for fd in chain:
            os.close(fd)


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

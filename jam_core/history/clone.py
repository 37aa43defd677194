"""``jam clone URL [PATH]``: the tree a remote holds, made a root on this computer as stubs.

The remote's ``meta/history/<tree>/<machine id>`` heads (``store.read_heads``) name the
snapshots each machine made last; clone takes the newest head of the tree (any machine),
fetches that snapshot (verified against its id, validated by ``snapshot.parse``), makes PATH a
root with that remote (its identity marker checked first: an empty directory is not a remote)
and ``[history] name`` set to the tree, then makes every entry: files as stubs (written aside,
renamed in without replacing anything, one ``syncfs`` for all, one catalog transaction),
empty files and symlinks as themselves, directories made without following symlinks. The pins
the snapshot recorded are applied and the history index records the snapshot as HEAD, the
parent of the next ``jam commit`` (or ``jam sync``).

``fetch_snapshot`` and ``place`` are shared with ``sync``; each entry is made by
``store.make_entry``, the one way ``restore`` makes entries too.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from jam_core.errors import JamError, RemoteError, UsageError, describe
from jam_core.fs import DIR_FLAGS, fd_path, rename_noreplace, syncfs
from jam_core.history.snapshot import _TREE, FILE, Item, Snapshot, SnapshotError, parse
from jam_core.history.store import HEADS, REGISTRY, make_entry, read_heads
from jam_core.model import Remote, Session
from jam_core.root import Root

MAX_CHAIN = 100_000  # parents walked at most when looking for a known snapshot


@dataclass
class CloneResult:
    root: Path
    tree: str = ""
    snapshot: str = ""
    machine: str = ""
    host: str = ""
    files: int = 0  # entries made (stubs, empty files, symlinks)
    stubs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


# -- reading a remote ----------------------------------------------------------------------------
def list_trees(remote: Remote, pm, session: Session) -> list[str]:
    """The trees whose heads ``remote`` holds. Three sources, as backends differ: a backend that
    lists ``meta/`` recursively (rclone) names ``history/<tree>/<machine>`` itself; a ``dir``
    remote's ``meta/history`` is read here (directory fd, no symlink followed); the registry
    ``meta/history-trees/<tree>`` that every push writes (``store.register_tree``) covers the
    rest (sftp)."""
    found: set[str] = set()
    for name in pm.hook.list_meta(remote=remote, prefix=HEADS, session=session) or []:
        parts = name.split("/")
        if len(parts) == 3 and _TREE.match(parts[1]):
            found.add(parts[1])
    for name in pm.hook.list_meta(remote=remote, prefix=REGISTRY, session=session) or []:
        tail = name.rpartition("/")[2]
        if _TREE.match(tail):
            found.add(tail)
    if remote.kind == "dir":
        try:
            fd = os.open(os.path.join(remote.location, "meta", HEADS), DIR_FLAGS)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                with os.scandir(fd) as it:
                    found |= {e.name for e in it if _TREE.match(e.name) and e.is_dir(follow_symlinks=False)}
            finally:
                os.close(fd)
    return sorted(found)


def fetch_snapshot(root_tmp: Path, remotes: list[Remote], sid: str, size: int, pm,
                   session: Session) -> tuple[bytes, Snapshot]:
    """The stored bytes of snapshot ``sid`` and the snapshot from the first of ``remotes`` that has it, verified
    against its id and validated (``parse``). SnapshotError / RemoteError with one line."""
    if not 0 < size <= (256 << 20):
        raise SnapshotError(f"snapshot {sid[:19]}: impossible size {size}; refused")
    errors = []
    for remote in remotes:
        fd = os.open(root_tmp, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            try:
                ok = pm.hook.fetch(remote=remote, oid=sid, dest=Path(fd_path(fd)), size=size, session=session)
            except (JamError, OSError) as exc:
                errors.append(f"{remote.name}: {describe(exc)}")
                continue
            if ok is not True:
                errors.append(f"{remote.name}: not there")
                continue
            if os.fstat(fd).st_size != size:
                raise SnapshotError(f"snapshot {sid[:19]} on remote {remote.name!r}: not {size} bytes; refused")
            data = os.pread(fd, size + 1, 0)
        finally:
            os.close(fd)
        return data, parse(data, expect=sid)  # verified and validated, or refused
    raise RemoteError(f"snapshot {sid[:19]}: no remote has it ({'; '.join(errors)[:300]})")


# -- making entries ------------------------------------------------------------------------------
class DirStack:
    """Directory descriptors along the current path. Items come sorted by path, so every
    directory's entries are contiguous: each directory is opened (or made) once, one
    component at a time, never through a symlink."""

    def __init__(self, root_fd: int):
        self.names: list[str] = []
        self.fds: list[int] = [os.dup(root_fd)]

    def get(self, parent: str, create: bool) -> int | None:
        parts = parent.split("/") if parent else []
        keep = 0
        while keep < len(parts) and keep < len(self.names) and parts[keep] == self.names[keep]:
            keep += 1
        while len(self.names) > keep:
            self.names.pop()
            os.close(self.fds.pop())
        for part in parts[keep:]:
            fd = self.fds[-1]
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)  # a symlink swapped in: ELOOP/ENOTDIR
            self.names.append(part)
            self.fds.append(nfd)
        return self.fds[-1]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.names = [], []


def place(root: Root, items: list[Item], remotes_of, cat, problems: list[str],
          rename=None) -> list[str]:
    """Make each of ``items`` (sorted by path) where nothing is: written aside, renamed in
    without replacing anything (``rename``: called with (dir fd, tmp, name, item) instead,
    for sync's replacements). One ``syncfs``, then one catalog transaction for the stubs.
    Returns the paths made; what could not be made is one line in ``problems``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    now_ns = time.time_ns()
    made: list[str] = []
    rows = []
    root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = DirStack(root_fd)
    try:
        for item in items:
            parent, _, name = item.path.rpartition("/")
            tmp = ""
            dfd = -1
            try:
                dfd = dirs.get(parent, create=True)
                tmp, rec = make_entry(dfd, name, item, tuple(remotes_of(item.oid)), stamp, now_ns)
                if rename is None:
                    rename_noreplace(dfd, tmp, name)
                elif not rename(dfd, tmp, name, item):
                    continue  # the callback said why (tmp removed below)
                tmp = ""
                if rec is not None:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    rows.append((item.path, rec, st))
                made.append(item.path)
            except FileExistsError:
                problems.append(f"{item.path}: something appeared there meanwhile; left as it is")
            except OSError as exc:
                problems.append(f"{item.path}: not made ({exc.strerror or exc}; a symlink or a file where a "
                                "directory should be?)")
            finally:
                if tmp and dfd >= 0:
                    try:
                        os.unlink(tmp, dir_fd=dfd)
                    except OSError:
                        pass
        syncfs(root_fd)
    finally:
        dirs.close()
        os.close(root_fd)
    if rows:
        with cat.transaction():
            for path, rec, st in rows:
                cat.add_stub(path, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, rec.remotes,
                             ino=st.st_ino, ctime_ns=st.st_ctime_ns)
    return made


# -- clone ---------------------------------------------------------------------------------------
def _empty_target(path: Path) -> Path:
    from jam_core.root import abspath

    p = abspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if not os.path.isdir(p.parent):
            raise UsageError(f"{p.parent} is not a directory") from None
        p.mkdir(0o755)
        return p
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{p} exists and is not a directory; clone into a new or empty directory")
    if os.listdir(p):
        raise UsageError(f"{p} is not empty; clone into a new or empty directory")
    return p


def default_path(url: str) -> str:
    tail = url.rstrip("/").rpartition("/")[2].rpartition(":")[2]
    return tail or "jam-clone"


def clone(url: str, path: str | os.PathLike | None, pm, tree: str | None = None, name: str = "origin",
          session: Session | None = None) -> CloneResult:
    """See the module's docstring. UsageError (exit 2) for a non-empty PATH, several trees
    without ``tree``, a URL that is no jam remote."""
    from jam_core.catalog import Catalog
    from jam_core.history.index import Index
    from jam_core.ops.remotes import add_remote
    from jam_core.root import CATALOG, check_remote_overlaps

    session = session or Session()
    if tree is not None and not _TREE.match(tree):
        raise UsageError(f"--tree {tree[:40]!r}: not a tree name (lowercase letters, digits, '.', '_', '-')")
    if not url.strip():
        raise UsageError("the remote URL is empty")
    parsed = pm.hook.parse_url(url=url)
    if parsed is None:
        scheme = url.split("://", 1)[0] if "://" in url else url
        raise UsageError(f"no installed plugin handles {scheme}:// remotes (see `jam plugins`)")
    remote = Remote(name=name, kind=parsed["kind"], url=url, location=parsed["location"], tier=0, options={})
    # the remote first: a URL that is not a jam remote (an empty mount point) is refused
    # before anything is made
    with session:
        rid = pm.hook.remote_id(remote=remote, session=session, create=False)
        if rid == "":
            raise UsageError(f"{url}: no jam remote there (its identity marker is missing); nothing cloned")
        trees = list_trees(remote, pm, session)
        if tree is None:
            if not trees:
                raise UsageError(f"{url}: no tree with snapshots there (made by `jam commit`); nothing cloned")
            if len(trees) > 1:
                raise UsageError(f"{url} holds {len(trees)} trees ({', '.join(trees)}); name one with --tree NAME")
            tree = trees[0]
        heads = read_heads(remote, tree, pm, session)
        if not heads:
            raise UsageError(f"{url}: no snapshot of tree {tree!r} there"
                             + (f" (trees: {', '.join(trees)})" if trees else ""))
        target = _empty_target(Path(path if path is not None else default_path(url)))
        if remote.kind == "dir":
            check_remote_overlaps(remote.location, target)
        tmp = target / ".jam-clone-tmp"  # O_TMPFILE needs a directory; .jam does not exist yet
        tmp.mkdir(0o700)
        try:
            best: tuple[int, str, bytes, Snapshot] | None = None
            for machine, (sid, size) in sorted(heads.items()):
                data, snap = fetch_snapshot(tmp, [remote], sid, size, pm, session)
                if snap.tree != tree:
                    raise SnapshotError(f"snapshot {sid[:19]} (head of {machine}) belongs to tree {snap.tree!r}, "
                                        f"not {tree!r}; refused")
                if best is None or (snap.time_ns, sid) > (best[0], best[1]):
                    best = (snap.time_ns, sid, data, snap)
        finally:
            os.rmdir(tmp)
    assert best is not None
    _t, sid, data, snap = best
    out = CloneResult(target, tree, sid, snap.machine, snap.host)
    root, _created = Root.init(target, default_remote=False)
    add_remote(root, pm, name, url, 0)
    with root.lock():
        root.update_config(lambda own: own.setdefault("history", {}).__setitem__("name", tree))
        with Index(root) as ix:
            ix.add(snap, data, (len(snap.items), 0, 0), make_head=True)
            ix.record_pushed(sid, name)
        with Catalog(root.jam_dir / CATALOG) as cat:
            names = (name,)
            made = place(root, snap.items, lambda _oid: names, cat, out.problems)
            out.files = len(made)
            out.stubs = sum(1 for i in snap.items if i.kind == FILE and i.size)
            if snap.pins:
                from jam_core.policy.pins import add_pins

                add_pins(root, snap.pins)
            from jam_core.hook.index import refresh

            refresh(root, cat)
    return out

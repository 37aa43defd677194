"""``jam clone URL [PATH]``: the tree a remote holds, made a root on this computer as stubs.

The remote's ``meta/history/<tree>/<machine id>`` heads (``store.read_heads``) name the
snapshots each machine made last; clone takes the newest head of the tree (any machine) and
fetches that snapshot (verified against its id, validated by ``snapshot.parse``; into an
unnamed O_TMPFILE in PATH) after the remote's identity marker was checked (an empty directory
is not a remote).

The root is built aside, in a stage ``PATH/.jam-<16 hex>.tmp`` that nobody else sees: its
``.jam/cloning`` mark first (JSON: the remote's id, the URL, the snapshot, the state; flocked
while a clone works on it), then a root there (config with the remote and ``[history] name``,
the history index with the snapshot as HEAD, the parent of the next commit), then every entry
(``make_all``): each file created as its stub under its own name (``store.EntryMaker``: no
temporary name, no rename, no fsync), empty files and symlinks as themselves, directories made
once each, then one ``syncfs``, the catalog in two statements, the pins. Only then does the
mark say ``moving`` and the stage's top entries move into PATH (``_move_in``: renamed without
replacing anything, ``.jam`` last, which makes PATH a root), the root is registered, its cd
index written, and the mark removed.

Killed at any instant, the same ``jam clone URL PATH`` completes it: a stage whose mark says
``moving`` (or a PATH whose ``.jam`` still holds the mark) is finished; a stage killed while
being built is removed and the clone begins again. Only a mark jam wrote, naming the same
remote, makes a stage jam's own; a PATH holding anything else (a user's file beside a stage,
another remote's unfinished clone, a look-alike directory) is refused and left as it is, and
a clone in progress (its mark flocked) is not disturbed.

``fetch_snapshot`` and ``place`` are shared with ``sync`` (``place`` makes each entry with
``store.make_entry`` under a temporary name and renames it in, as ``restore`` does: there
the directories are the user's).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from jam_core.errors import JamError, UsageError
from jam_core.fs import DIR_FLAGS, rename_noreplace, syncfs
from jam_core.history.snapshot import _TREE, FILE, Item, Snapshot, SnapshotError, machine_id
from jam_core.history.store import HEADS, REGISTRY, fetch_snapshot, make_entry, read_heads, still_in
from jam_core.model import Remote, Session
from jam_core.root import Root
from jam_core.scan import new_stub_stamp

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
    from jam_core.history.store import EntryMaker

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    now_ns = time.time_ns()
    maker = EntryMaker(stamp, now_ns)
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
                tmp, rec = make_entry(dfd, name, item, tuple(remotes_of(item.oid)), stamp, now_ns, maker=maker)
                if not still_in(root_fd, item.path, dfd):  # its directory moved out of the root (invariant 7)
                    problems.append(f"{item.path}: its directory moved while it was being made; not made")
                    continue  # (tmp removed below)
                if rename is None:
                    rename_noreplace(dfd, tmp, name)
                elif not rename(dfd, tmp, name, item):
                    continue  # the callback said why (tmp removed below)
                tmp = ""
                if rec is not None:
                    rows.append((item.path, rec, new_stub_stamp(dfd, name, rec)))
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
            for path, rec, (ino, ctime) in rows:
                cat.add_stub(path, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, rec.remotes,
                             ino=ino, ctime_ns=ctime)
    return made


# -- clone ---------------------------------------------------------------------------------------
MARK = "cloning"  # STAGE/.jam/cloning, then ROOT/.jam/cloning until the clone is complete
MARK_MAGIC = "jam-clone 1"


def default_path(url: str) -> str:
    tail = url.rstrip("/").rpartition("/")[2].rpartition(":")[2]
    return tail or "jam-clone"


def _write_mark(fd: int, state: dict) -> None:
    """Rewrite the mark in place (the flock is on its inode): the new text first, then cut to
    its length, so a kill between leaves the new lines complete (the rest is ignored)."""
    import json

    data = (MARK_MAGIC + "\n" + json.dumps(state, sort_keys=True) + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _read_mark(fd: int) -> dict | None:
    """The state a mark records (its remote's id named), None if it is not one jam wrote."""
    import json

    lines = os.pread(fd, 1 << 16, 0).split(b"\n")
    if len(lines) < 3 or lines[0] != MARK_MAGIC.encode():
        return None
    try:
        state = json.loads(lines[1])
    except ValueError:
        return None
    return state if isinstance(state, dict) and isinstance(state.get("remote"), str) else None


def _lock_mark(fd: int, where: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"another jam clone is making {where} now") from None


@dataclass
class _Unfinished:
    """What a clone killed part-way left in PATH: its stage (``PATH/.jam-<hex>.tmp``, a root
    being built) or, once the stage was moved in, ``PATH/.jam/cloning``."""

    mark_fd: int = -1  # open and flocked
    state: dict = field(default_factory=dict)
    stage: str = ""  # the stage's name in PATH ("" once .jam was moved in)
    empties: list[str] = field(default_factory=list)  # empty stages (killed as one was made)


def _open_mark(dfd: int, parts: list[str]) -> int:
    """The mark at ``parts`` under ``dfd``, each directory opened without following a symlink;
    -1 if it is not there."""
    fd = os.dup(dfd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return -1
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink where jam makes a directory: not ours
            return -1
        raise
    finally:
        os.close(fd)


def _only_empty(dfd: int, name: str) -> bool:
    """``name`` is a directory holding nothing, or only a ``.jam`` holding nothing or only an
    empty mark (a stage killed as it was being made): removing it loses nothing."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return False
    try:
        inside = os.listdir(fd)
        if not inside:
            return True
        if inside != [".jam"]:
            return False
        try:
            sub = os.open(".jam", DIR_FLAGS, dir_fd=fd)
        except OSError:
            return False
        try:
            names = os.listdir(sub)
            if not names:
                return True
            if names != [MARK]:
                return False
            st = os.stat(MARK, dir_fd=sub, follow_symlinks=False)
            return stat.S_ISREG(st.st_mode) and st.st_size == 0
        finally:
            os.close(sub)
    finally:
        os.close(fd)


def _inspect(p: Path) -> tuple[list[str], _Unfinished | None]:
    """(PATH's entries, what an unfinished clone left there or None). Only what a mark that jam
    wrote (naming a remote) proves to be a clone's is taken as one. Nothing is changed."""
    from jam_core.fs import is_jam_tmp
    from jam_core.root import JAM_DIR

    pfd = os.open(p, DIR_FLAGS)
    found: _Unfinished | None = None
    try:
        names = os.listdir(pfd)
        if not names:
            return names, None
        if JAM_DIR in names:
            fd = _open_mark(pfd, [JAM_DIR, MARK])
            if fd < 0:
                return names, None
            state = _read_mark(fd)
            if state is None:
                os.close(fd)
                return names, None
            return names, _Unfinished(fd, state)
        empties = []
        for n in names:
            if not is_jam_tmp(n):
                continue
            if _only_empty(pfd, n):
                empties.append(n)
                continue
            fd = _open_mark(pfd, [n, JAM_DIR, MARK])
            if fd < 0:
                continue
            state = _read_mark(fd)
            if state is None or found is not None:  # not jam's mark, or two stages: not one clone's
                os.close(fd)
                if found is not None:
                    os.close(found.mark_fd)
                    found = None
                return names, None
            found = _Unfinished(fd, state, n)
        if found is not None:
            found.empties = empties
        elif empties and len(empties) == len(names):
            found = _Unfinished(-1, {}, "", empties)
        return names, found
    except BaseException:
        if found is not None and found.mark_fd >= 0:
            os.close(found.mark_fd)
        raise
    finally:
        os.close(pfd)


def _target(path: Path, rid: str) -> tuple[Path, bool, _Unfinished | None]:
    """(PATH made absolute, made here?, an unfinished clone of this remote there). A PATH that
    is not a directory, not empty and not this remote's unfinished clone is refused."""
    from jam_core.root import abspath, find_root

    p = abspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if not os.path.isdir(p.parent):
            raise UsageError(f"{p.parent} is not a directory") from None
        inside = find_root(p.parent)
        if inside is not None:
            raise UsageError(f"{p} would be inside the jam root {inside}; clone somewhere else") from None
        p.mkdir(0o755)
        return p, True, None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{p} exists and is not a directory; clone into a new or empty directory")
    names, left = _inspect(p)
    if names and left is None:
        raise UsageError(f"{p} is not empty; clone into a new or empty directory")
    if left is not None and left.mark_fd >= 0:
        _lock_mark(left.mark_fd, p)
        if left.state.get("remote") != rid:
            os.close(left.mark_fd)
            raise UsageError(f"{p} holds an unfinished clone of another remote ({left.state.get('url', '?')[:200]}); "
                             "rerun that clone, or remove it")
        if left.state.get("state") != "moving" and left.stage and len(names) > 1 + len(left.empties):
            os.close(left.mark_fd)
            raise UsageError(f"{p} is not empty (beside an unfinished clone); clone into a new or empty directory")
    inside = find_root(p.parent)
    if inside is not None:
        raise UsageError(f"{p} is inside the jam root {inside}; clone somewhere else")
    return p, False, left


def _stage_names(dfd: int) -> list[str]:
    from jam_core.root import JAM_DIR

    return sorted(n for n in os.listdir(dfd) if n != JAM_DIR)


def _move_in(p: Path, stage: str) -> None:
    """The finished root at ``PATH/stage`` moved into PATH: every top entry, ``.jam`` last (it
    makes PATH a root), each renamed without replacing anything. Killed meanwhile, the next
    ``jam clone`` of the same remote into PATH moves the rest."""
    from jam_core.fs import RENAME_NOREPLACE, renameat2
    from jam_core.root import JAM_DIR

    pfd = os.open(p, DIR_FLAGS)
    try:
        sfd = os.open(stage, DIR_FLAGS, dir_fd=pfd)
        try:
            for n in _stage_names(sfd) + [JAM_DIR]:
                try:
                    renameat2(sfd, n, pfd, n, RENAME_NOREPLACE)
                except FileExistsError:
                    raise JamError(f"{p / n} appeared while the clone was being made; move it away and run the "
                                   "same `jam clone` again to finish") from None
        finally:
            os.close(sfd)
        os.rmdir(stage, dir_fd=pfd)
        syncfs(pfd)
    finally:
        os.close(pfd)


class _OnePerDir:
    """What ``hook.index.refresh`` reads of a catalog (``stubs()``), one stub per directory:
    the cd index depends only on the directories that hold stubs, so 100,000 stubs in 1,000
    directories cost 1,000 lookups, not 100,000."""

    def __init__(self, paths):
        self._paths = paths

    def stubs(self) -> dict[str, tuple]:
        return dict.fromkeys(self._paths, ("", 0))


def _finish(p: Path, left: _Unfinished, out: CloneResult, stub_paths: list[str] | None = None) -> None:
    """Move the stage in (if not yet), remove the mark, register the root, its cd index."""
    from jam_core.catalog import Catalog
    from jam_core.hook.index import refresh
    from jam_core.root import CATALOG, JAM_DIR, register_root

    st = left.state
    out.tree, out.snapshot, out.machine, out.host = (str(st.get(k, "")) for k in ("tree", "snapshot", "machine",
                                                                               "host"))
    out.files, out.stubs = int(st.get("files", 0)), int(st.get("stubs", 0))
    if left.stage:
        _move_in(p, left.stage)
    pfd = os.open(p, DIR_FLAGS)
    try:
        for n in left.empties:  # stages a killed clone had only begun: nothing in them
            _remove_stage(p, n)
        root = Root(p)
        register_root(p)
        if stub_paths is not None:  # (one per directory: what this clone just made)
            refresh(root, _OnePerDir(stub_paths))
        else:
            with Catalog(root.jam_dir / CATALOG) as cat:
                refresh(root, cat)
        os.unlink(os.path.join(JAM_DIR, MARK), dir_fd=pfd)  # last: complete
    finally:
        os.close(pfd)


def clone(url: str, path: str | os.PathLike | None, pm, tree: str | None = None, name: str = "origin",
          session: Session | None = None) -> CloneResult:
    """See the module's docstring. UsageError (exit 2) for a non-empty PATH, several trees
    without ``tree``, a URL that is no jam remote."""
    from jam_core.root import check_remote_overlaps

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
        rid = str(rid)
        target = Path(path if path is not None else default_path(url))
        p, made, left = _target(target, rid)
        if left is not None:
            try:
                if tree is not None and left.state.get("tree", tree) != tree:
                    raise UsageError(f"{p} holds an unfinished clone of tree {left.state.get('tree')!r}; rerun it "
                                     "without --tree to finish it, or remove it")
                if left.mark_fd >= 0 and (left.state.get("state") == "moving" or not left.stage):
                    out = CloneResult(p)  # the stage was complete: only moving it in was left to do
                    _finish(p, left, out)
                    return out
                for n in ([left.stage] if left.stage else []) + left.empties:
                    _remove_stage(p, n)  # killed while it was being built: begin again
            finally:
                if left.mark_fd >= 0:
                    os.close(left.mark_fd)
        try:
            if remote.kind == "dir":
                check_remote_overlaps(remote.location, p)
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
            best: tuple[int, str, bytes, Snapshot] | None = None
            me = machine_id()
            ours: list[tuple[bytes, Snapshot]] = []  # this machine's own head (a root of it that was lost)
            for machine, (sid, size) in sorted(heads.items()):
                data, snap = fetch_snapshot(p, [remote], sid, size, pm, session)  # O_TMPFILE: invisible
                if snap.tree != tree:
                    raise SnapshotError(f"snapshot {sid[:19]} (head of {machine}) belongs to tree {snap.tree!r}, "
                                        f"not {tree!r}; refused")
                if machine == me:
                    ours.append((data, snap))
                if best is None or (snap.time_ns, sid) > (best[0], best[1]):
                    best = (snap.time_ns, sid, data, snap)
        except BaseException:
            if made:
                os.rmdir(p)
            raise
    assert best is not None
    _t, sid, data, snap = best
    out = CloneResult(p, tree, sid, snap.machine, snap.host)
    _build(p, made, url, rid, name, tree, sid, data, snap, pm, out, [o for o in ours if o[1].id != sid])
    return out


def _remove_stage(p: Path, stage: str) -> None:
    """Remove a stage this clone's mark proved to be jam's own (never through a symlink)."""
    from jam_core.fs import remove_tree

    pfd = os.open(p, DIR_FLAGS)
    try:
        remove_tree(stage, pfd)
    finally:
        os.close(pfd)


def _build(p: Path, made: bool, url: str, rid: str, name: str, tree: str, sid: str, data: bytes, snap: Snapshot,
           pm, out: CloneResult, ours: list[tuple[bytes, Snapshot]] = ()) -> None:
    """Build the root aside in PATH's stage (``PATH/.jam-<hex>.tmp``, its mark in its ``.jam``
    first), then move it in (``_move_in``) and finish (``_finish``)."""
    from jam_core.catalog import Catalog
    from jam_core.fs import tmp_name
    from jam_core.history.index import Index
    from jam_core.ops.remotes import add_remote
    from jam_core.root import CATALOG, JAM_DIR

    stage = tmp_name()
    sp = p / stage
    state = {"remote": rid, "url": url, "tree": tree, "snapshot": sid, "machine": snap.machine,
             "host": snap.host, "state": "building"}
    mark = -1
    moving = False
    firsts: list[str] = []  # the first stub of each directory (for the cd index)
    try:
        os.mkdir(sp, 0o700)
        os.mkdir(sp / JAM_DIR, 0o700)
        mark = os.open(sp / JAM_DIR / MARK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600)
        _lock_mark(mark, p)
        _write_mark(mark, state)
        root, _created = Root.init(sp, register=False, default_remote=False)
        add_remote(root, pm, name, url, 0)
        with Session() as rs, root.lock():  # rs: the refs' connection to the remote
            root.update_config(lambda own: own.setdefault("history", {}).__setitem__("name", tree))
            with Index(root) as ix:
                ix.add(snap, data, (len(snap.items), 0, 0), make_head=True)
                ix.record_pushed(sid, name)
                for d, s in ours:  # this machine's head there (a root of it lost, cloned again): known here,
                    ix.add(s, d, (len(s.items), 0, 0), make_head=False)  # so this root may replace it
                    ix.record_pushed(s.id, name)
            recorder, origin = _refer(root, pm, rs)
            with Catalog(root.jam_dir / CATALOG) as cat:
                out.files = make_all(sp, snap.items, (name,), cat, out.problems, firsts)
                out.stubs = sum(1 for i in snap.items if i.kind == FILE and i.size)
                from jam_core.ops.refs import referenced

                out.problems += recorder.publish(referenced(root, cat), [origin])
            if snap.pins:
                from jam_core.policy.pins import add_pins

                add_pins(root, snap.pins)
        syncfs(mark)  # the whole stage durable before the mark says it is complete
        state.update(state="moving", files=out.files, stubs=out.stubs)
        _write_mark(mark, state)
        os.fsync(mark)
        moving = True
        _finish(p, _Unfinished(mark, state, stage), out, firsts)
    except BaseException:
        if not moving:  # nothing of it is in PATH yet: it goes (killed, the next clone removes it)
            try:
                _remove_stage(p, stage)
                if made:
                    os.rmdir(p)
            except OSError:
                pass
        raise
    finally:
        if mark >= 0:
            os.close(mark)


def _refer(root: Root, pm, session: Session):
    """Before any stub is made: record on the remote (``refs``) that this new root refers to
    every object of the snapshot it clones, so that no other root's removal (the first
    computer's ``jam gc --keep``) takes them from under it; and refuse if one is being removed
    there at this moment. Returns the recorder and the remote."""
    from jam_core.history.index import Index, kept_objects
    from jam_core.history.store import absent
    from jam_core.ops.refs import Recorder

    origin = root.remotes()[0]
    recorder = Recorder(root, pm, session)
    wanted = kept_objects(root)
    recorder.before_store(origin, wanted)
    going = recorder.removing_elsewhere(origin) & wanted
    if going:
        raise JamError(f"another root is removing {len(going)} object(s) of this snapshot from {origin.url} at "
                       "this moment; nothing cloned (run the clone again)")
    # the refs recorded, what the remote holds now is what the stubs can count on: a removal
    # that ran wholly between the head's read and the refs has taken what it took
    with Index(root, create=False) as ix:
        items = [i for i in ix.load(ix.head()).items if i.kind == FILE and i.size]
    gone = absent([origin], {i.oid: i.size for i in items}, pm, session)
    if gone:
        lost = [i.path for i in items if i.oid in gone]
        raise JamError(f"{origin.url} no longer holds {len(lost)} file(s) of this snapshot (e.g. {lost[0]}; removed "
                       "by another computer's `jam gc` meanwhile, or never stored); nothing cloned (run the clone "
                       "again: it takes the head as it is now)")
    return recorder, origin


_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE}


def make_all(top: Path, items: list[Item], remotes: tuple[str, ...], cat, problems: list[str],
             firsts: list[str] | None = None) -> int:
    """Make every one of ``items`` (sorted by path) in ``top``, a directory this clone made and
    nobody else sees yet: each entry created under its own name (exclusively, never through a
    symlink: no temporary name, no rename), directories made once each, one ``syncfs`` for all
    by the caller, one catalog transaction. Returns how many entries were made."""
    from jam_core.history.store import EntryMaker

    maker = EntryMaker(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.time_ns())
    make = maker.make
    rows = []
    count = 0
    top_fd = os.open(top, DIR_FLAGS)
    dirs = DirStack(top_fd)
    last_parent, dfd = None, -1
    try:
        for item in items:
            parent, _, base = item.path.rpartition("/")
            try:
                if parent != last_parent:
                    last_parent = None
                    dfd = dirs.get(parent, create=True)
                    last_parent = parent
                rec, st = make(dfd, base, base, item, remotes, True)
            except OSError as exc:
                if exc.errno in _FATAL:  # every next entry would fail too: nothing is cloned
                    raise JamError(f"{item.path}: {exc.strerror or exc}; nothing cloned") from None
                problems.append(f"{item.path}: not made ({exc.strerror or exc})")
                continue
            count += 1
            if rec is not None:
                if firsts is not None and (not rows or rows[-1][0].rpartition("/")[0] != parent):
                    firsts.append(item.path)
                rows.append((item.path, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, st.st_ino, st.st_ctime_ns))
    finally:
        dirs.close()
        os.close(top_fd)
    if rows:
        cat.upsert_stubs(rows)  # one transaction
        now = time.time()
        with cat.transaction():  # the rows record_location writes, in one statement
            cat.db.executemany("INSERT OR IGNORE INTO locations VALUES (?,?,?,?)",
                               [(oid, name, size, now) for oid, size in {r[1]: r[2] for r in rows}.items()
                                for name in remotes])
    return count

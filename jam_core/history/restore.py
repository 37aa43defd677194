"""``jam log``, ``jam diff``, ``jam restore``: reading the snapshots this root keeps.

``resolve`` turns what a person types into a snapshot id: a full id, a unique prefix of its
hex (4 digits at least, ``b3:`` optional), or a date (``2026-11-30``, ``2026-11-30 14:05``,
ISO ``2026-11-30T14:05:00``, local time; a bare day means its end) or an age (``2h``, ``3d``:
that long ago), which names the newest snapshot at or before that instant.

``restore`` brings back what a snapshot recorded under a path, as stubs made exactly as
``stash`` makes them (``write_stub`` from the snapshot's record, written aside and renamed in
without replacing anything) or fetched (``--fetch``: the stubs, then ``checkout``: verified).
It never overwrites a file that differs from the version being restored (nothing is restored
then; ``--as NEWPATH`` puts it elsewhere), creates directories without following symlinks and
never writes outside the root (paths in a snapshot are validated when it is parsed).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field

from jam_core.catalog import Catalog
from jam_core.errors import JamError, UsageError, describe
from jam_core.fs import DIR_FLAGS, rename_noreplace, syncfs
from jam_core.history.index import Index, exists
from jam_core.history.snapshot import FILE, LINK, Item, Snapshot, changes
from jam_core.history.store import make_entry, still_in, under
from jam_core.root import CATALOG, Root, check_rel
from jam_core.scan import LOCAL, STUB, classify, new_stub_stamp

_HEX = re.compile(r"\A(?:b3:)?([0-9a-f]{4,64})\Z")
_DATE = re.compile(r"\A(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2}))?)?\Z")


def short(sid: str) -> str:
    return sid.partition(":")[2][:12]


def open_index(root: Root) -> Index:
    if not exists(root):
        raise UsageError("no snapshot yet (make one with `jam commit`)")
    return Index(root, create=False)


def resolve(ix: Index, text: str, now: float | None = None) -> str:
    """The snapshot ``text`` names (see the module's docstring); UsageError otherwise."""
    rows = ix.rows()
    if not rows:
        raise UsageError("no snapshot yet (make one with `jam commit`)")
    m = _HEX.match(text.lower())
    if m:
        found = [r[0] for r in rows if r[0].partition(":")[2].startswith(m.group(1))]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(f"{text!r} names {len(found)} snapshots; give more of the id")
    at = _instant(text, now)
    if at is None:
        raise UsageError(f"{text[:80]!r} is neither a snapshot of this root (an id or a unique prefix) nor a date "
                         "(2026-11-30, '2026-11-30 14:05') nor an age (3d)")
    before = [r for r in rows if r[1] <= at]
    if not before:
        raise UsageError(f"no snapshot at or before {text!r} (the oldest is from "
                         f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(rows[-1][1] / 1e9))})")
    return before[0][0]


def _instant(text: str, now: float | None) -> int | None:
    m = _DATE.match(text.strip())
    if m:
        y, mo, d, h, mi, s = m.groups()
        try:  # a day or an hour that does not exist is a typo: mktime would roll it over
            import datetime

            datetime.datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0))
        except ValueError:
            return None
        try:
            if h is None:
                t = time.mktime((int(y), int(mo), int(d), 23, 59, 59, 0, 0, -1)) + 0.999999999
            else:
                t = time.mktime((int(y), int(mo), int(d), int(h), int(mi), int(s or 0), 0, 0, -1))
                t += 0.999999999 if s is None else 0
        except (OverflowError, ValueError):
            return None
        return int(t * 1e9)
    try:
        from jam_core.units import parse_duration

        ago = parse_duration(text.strip(), "age")
    except UsageError:
        return None
    return int(((time.time() if now is None else now) - ago) * 1e9)


# -- log ---------------------------------------------------------------------------------------
@dataclass
class LogRow:
    id: str
    time_ns: int
    machine: str
    host: str
    message: str
    files: int
    added: int
    modified: int
    deleted: int
    change: str = ""  # for a path: added, modified, deleted
    item: Item | None = None


def log(root: Root, rel: str | None = None) -> list[LogRow]:
    """The snapshots this root keeps, newest first; for ``rel``, only those in which what is
    at ``rel`` (a file, or anything under a directory) changed from the next older one."""
    with open_index(root) as ix:
        rows = [LogRow(*r[:9]) for r in ix.rows()]
        if rel is None or rel == ".":
            return rows
        out = []
        older: dict[str, Item] = {}
        for row in reversed(rows):  # oldest first
            snap = ix.load(row.id)
            mine = {p: i for p, i in snap.by_path().items() if under(p, [rel])}
            added, modified, deleted = changes(older, mine)
            if added or modified or deleted:
                row.added, row.modified, row.deleted = len(added), len(modified), len(deleted)
                row.change = "added" if added else "modified" if modified else "deleted"
                row.item = mine.get(rel)
                out.append(row)
            older = mine
        return list(reversed(out))


# -- diff --------------------------------------------------------------------------------------
@dataclass
class Diff:
    a: str  # snapshot id
    b: str  # snapshot id, or "" for the tree now
    added: list[Item] = field(default_factory=list)
    modified: list[tuple[Item, Item]] = field(default_factory=list)
    deleted: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def tree_now(root: Root, rels: list[str], ix: Index, skipped: list) -> dict[str, Item]:
    """What the tree holds under ``rels`` now (local files hashed, through the ids cache)."""
    from jam_core.history.store import OneDir, hash_one, scan

    items, pending, new_ids = scan(root, rels, ix, skipped)
    with OneDir(root.path) as dirs:
        for e in pending:
            try:
                got = hash_one(dirs, e)
            except (JamError, OSError) as exc:
                skipped.append((e.rel, describe(exc)))
                continue
            if got is None:
                skipped.append((e.rel, "changed while it was being read"))
                continue
            fd, oid = got
            os.close(fd)
            st = e.st
            new_ids.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, oid, st.st_mode & 0o7777))
            items[e.rel] = Item(e.rel, FILE, oid, st.st_size, st.st_mode & 0o7777, st.st_mtime_ns)
    try:
        ix.remember_ids(new_ids)
    except Exception:  # noqa: BLE001  (a cache: another jam may hold the db)
        pass
    return items


def diff(root: Root, a: str | None = None, b: str | None = None, rel: str = ".") -> Diff:
    """Snapshot ``a`` (default: the newest) against snapshot ``b`` (default: the tree now),
    under ``rel``."""
    with open_index(root) as ix:
        sa = resolve(ix, a) if a else ix.head()
        if sa is None:
            raise UsageError("no snapshot yet (make one with `jam commit`)")
        old = {p: i for p, i in ix.load(sa).by_path().items() if under(p, [rel])}
        out = Diff(sa, "")
        if b:
            out.b = resolve(ix, b)
            new = {p: i for p, i in ix.load(out.b).by_path().items() if under(p, [rel])}
        else:
            from jam_core.history.store import settle_foreign

            new = tree_now(root, [rel], ix, out.skipped)
            out.skipped = settle_foreign(out.skipped, old)
            for p, _why in out.skipped:  # unreadable now (a file, or a directory): not reported as deleted
                for q in old:
                    if q == p or q.startswith(p + "/"):
                        new.setdefault(q, old[q])
        added, modified, deleted = changes(old, new)
        out.added = [new[p] for p in added]
        out.modified = [(old[p], new[p]) for p in modified]
        out.deleted = [old[p] for p in deleted]
        return out


# -- restore -----------------------------------------------------------------------------------
@dataclass
class RestoreResult:
    snapshot: str = ""
    restored: list[str] = field(default_factory=list)  # paths made (stubs, links, empty files)
    present: list[str] = field(default_factory=list)  # already as in the snapshot
    fetched: object = None  # the checkout's Result with fetch


class _Conflict(JamError):
    exit_code = 1


def restore(root: Root, rel: str, pm=None, at: str | None = None, as_rel: str | None = None, fetch: bool = False,
            session=None) -> RestoreResult:
    """Bring back what snapshot ``at`` (default: the newest) recorded at ``rel`` (a file or a
    directory), at ``as_rel`` if given. All or nothing: if any destination holds something
    that differs, nothing is written (exit 1, one line)."""
    check_rel(rel)
    out = RestoreResult()
    with root.lock():
        with open_index(root) as ix:
            sid = resolve(ix, at) if at else ix.head()
            if sid is None:
                raise UsageError("no snapshot yet (make one with `jam commit`)")
            out.snapshot = sid
            snap = ix.load(sid)
            stored = {}
            chosen = [i for i in snap.items if under(i.path, [rel])]
            if not chosen:
                raise UsageError(f"{rel} is not in snapshot {short(sid)}")
            for i in chosen:
                if i.kind == FILE:
                    stored[i.oid] = sorted(ix.stored_on(i.oid))
        dest_of = _destinations(rel, as_rel, chosen)
        with Catalog(root.jam_dir / CATALOG) as cat:
            _restore(root, snap, chosen, dest_of, stored, cat, out)
            from jam_core.hook.index import refresh

            refresh(root, cat)
    if fetch and out.restored:
        from jam_core.ops.checkout import checkout

        files = [dest_of[i.path] for i in chosen if i.kind == FILE and i.size and dest_of[i.path] in out.restored]
        if files:
            out.fetched = checkout(root, files, pm, session)
    return out


def _destinations(rel: str, as_rel: str | None, chosen: list[Item]) -> dict[str, str]:
    if as_rel is None:
        return {i.path: i.path for i in chosen}
    try:
        check_rel(as_rel)
    except ValueError as exc:
        raise UsageError(f"--as {as_rel[:80]!r}: {exc}") from None
    if as_rel == ".":
        raise UsageError("--as must name a new path inside the root")
    out = {}
    for i in chosen:
        tail = i.path[len(rel):] if rel != "." else "/" + i.path
        out[i.path] = as_rel + tail if i.path != rel else as_rel
    return out


def _open_parent(root_fd: int, rel: str, create: bool) -> int | None:
    """The descriptor of ``rel``'s directory, each component opened without following a
    symlink, made when ``create``; None if missing and not ``create``. A component that is a
    symlink or not a directory is a conflict."""
    parts = rel.split("/")[:-1]
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _Conflict(f"{'/'.join(parts[:i + 1])} is not a directory (a symlink or a file: "
                                f"{exc.strerror}); nothing restored (use --as NEWPATH)") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _state(dir_fd: int | None, name: str, item: Item, verify: bool = False) -> str:
    """What is at a destination: "missing", "same" (as the snapshot), or a description of
    what differs. ``verify`` (sync, before it removes or replaces what is "same"): a stub is
    judged by its bytes too (~0.1 ms each), so one written into with its size, mtime and
    blocks put back is not "same"; restore, which never writes over what is there, looks at
    stats alone."""
    if dir_fd is None:
        return "missing"
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "missing"
    if item.kind == LINK:
        if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dir_fd) == item.target:
            return "same"
        return "something else is there"
    if not stat.S_ISREG(st.st_mode):
        return "something that is not a file is there"
    from jam_core.fs import fd_path

    path = f"{fd_path(dir_fd)}/{name}"
    state, rec, _problem = classify(path, st, verify=verify)
    if state == STUB and rec is not None:
        return "same" if rec.oid == item.oid else "a stub of other content is there"
    if state == LOCAL:
        if st.st_size != item.size:
            return "a local file with other content is there"
        from jam_core.fs import NotTheFile, open_regular
        from jam_core.objects import hash_fd, split_oid

        try:
            fd = open_regular(dir_fd, name, expect=st)
        except (NotTheFile, FileNotFoundError):  # replaced (a FIFO, another file) or gone meanwhile
            return "something that changed while it was being looked at is there"
        try:
            oid, _size = hash_fd(fd, split_oid(item.oid)[0])
        finally:
            os.close(fd)
        return "same" if oid == item.oid else "a local file with other content is there"
    return "a stub that was written into is there"


def _restore(root: Root, snap: Snapshot, chosen: list[Item], dest_of: dict[str, str], stored, cat, out) -> None:
    """Check every destination, then make each entry (``store.make_entry``, as clone and sync
    do: written aside, renamed in without replacing anything), then one ``syncfs`` for all
    before the catalog records the stubs."""
    root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        todo = []
        for i in chosen:  # first: is every destination free or the same?
            dest = dest_of[i.path]
            dfd = _open_parent(root_fd, dest, create=False)
            try:
                st = _state(dfd, dest.rpartition("/")[2], i)
            finally:
                if dfd is not None:
                    os.close(dfd)
            if st == "same":
                out.present.append(dest)
            elif st == "missing":
                todo.append(i)
            else:
                raise _Conflict(f"{dest}: {st}, which differs from its version in snapshot "
                                f"{short(snap.id)}; nothing restored (use --as NEWPATH)")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        now_ns = time.time_ns()
        remotes_all = [r.name for r in root.remotes()]
        made = []
        try:
            _make(root_fd, todo, dest_of, stored, remotes_all, stamp, now_ns, made, out)
        finally:  # what was made (all, or those before a conflict) is made durable and recorded
            syncfs(root_fd)
            if made:
                with cat.transaction():
                    for dest, rec, (ino, ctime) in made:
                        cat.add_stub(dest, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, rec.remotes,
                                     ino=ino, ctime_ns=ctime)
    finally:
        os.close(root_fd)


def _make(root_fd: int, todo: list[Item], dest_of, stored, remotes_all, stamp: str, now_ns: int, made: list,
          out) -> None:
    for i in todo:
        dest = dest_of[i.path]
        name = dest.rpartition("/")[2]
        dfd = _open_parent(root_fd, dest, create=True)
        tmp = ""
        try:
            tmp, rec = make_entry(dfd, name, i, tuple(stored.get(i.oid) or remotes_all), stamp, now_ns)
            if not still_in(root_fd, dest, dfd):  # its directory moved out of the root meanwhile (invariant 7)
                raise _Conflict(f"{dest}: its directory moved while it was being restored; nothing written there")
            try:
                rename_noreplace(dfd, tmp, name)
            except FileExistsError:
                raise _Conflict(f"{dest}: appeared while it was being restored; left as it is") from None
            tmp = ""
            if rec is not None:
                made.append((dest, rec, new_stub_stamp(dfd, name, rec)))
            out.restored.append(dest)
        finally:
            if tmp:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            os.close(dfd)

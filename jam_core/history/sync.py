"""``jam sync``: commit, push, fetch the other machines' snapshots of this tree, merge them.

1. ``store.commit`` (nothing if unchanged; it pushes and writes this machine's head).
2. Under the root's lock: read every machine's head of the tree on every remote
   (``store.read_heads``); fetch each snapshot not known here and its parents until a known one
   (each verified against its id and validated), kept in the history index (so gc keeps what
   they need and ``jam log`` shows them).
   Before any merge, the objects of those heads are recorded in this root's refs on every
   remote that answered (``_refer``, as ``jam clone`` does), so no root's removal takes them
   from under the stubs about to be made; the full refs are published after the merges.
3. For each other head: the merge base is the newest common ancestor. A head that is an
   ancestor of ours is done; if ours is an ancestor of it, its changes are applied and it
   becomes HEAD (a fast-forward: no new snapshot, so two machines do not answer each other's
   merges forever); otherwise three ways per path:

   * changed only there: applied here. A new file arrives as a stub of its record; a file
     deleted there is removed here, and a file modified there replaced by a stub of the new
     version, only if the local file is exactly the base version (stub of that id, or a local
     file of that hash), checked again after the atomic exchange (put back if it changed in
     that instant). Renames are a delete and an add. A file modified there that is not
     the base version here after all (changed since the commit, a stub written into, open
     for writing) stays, and theirs arrives beside it as a conflict copy (below). So does
     what cannot be made because the tree holds another kind of entry on its path (a file
     here, a directory there of one name): the blocked part is renamed as a conflict copy.
     Directories that removals left empty are removed.
   * changed on both sides, differently: both kept. Ours stays at the path; theirs arrives as
     ``NAME (conflicted copy from HOST YYYY-MM-DD).EXT`` (a stub), reported (exit 1).
     Deleted here and modified there: the modified version comes back. Deleted there and
     modified here: ours stays.

   Pins (``jam pin``, ``ROOT/.jam/pins``) merge the same way, per path: pinned or unpinned on
   one side since the base -> as that side has it; with no common base, a pin either side has
   stays (the safe side). What the merge changed is applied to the root's pins as a delta.

   The merge is recorded as a snapshot whose parents are ours and theirs.
4. ``store.commit`` again: it records what the tree now is if it differs from the merge, and
   pushes the merge and this machine's head.
5. The stubs under the pins (a pin the merge brought, or a file that arrived under a pin) are
   fetched as ``jam pin`` fetches them (``ops.checkout``): a pin means "kept on this device".
   A fetch that fails is a problem (exit 1); the sync itself stands.

Killed at any instant, nothing is lost and the next sync completes: every change to the tree
is an atomic rename or exchange of a file that is the base version (whose content the
snapshots keep), heads are per machine (nobody else writes ours), and the merge is idempotent
(what was applied already is the same on both sides at the next run).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
import zlib
from dataclasses import dataclass, field

from jam_core.errors import JamError, UsageError, describe
from jam_core.fs import FileBusy, Leases, exchange, open_regular, same_file, tmp_name
from jam_core.history.clone import MAX_CHAIN, place
from jam_core.history.index import Index
from jam_core.history.snapshot import FILE, Item, Snapshot, SnapshotError, encode, machine_id, tree_name
from jam_core.history.store import (
    SnapshotAbsent,
    durable_remotes,
    fetch_snapshot,
    known_here,
    read_heads,
    shared_id_problem,
    still_in,
)
from jam_core.model import Session
from jam_core.objects import is_valid_oid
from jam_core.root import Root, check_rel


@dataclass
class SyncResult:
    committed: str = ""  # the snapshot the first commit made ("" if nothing changed)
    merged: list[str] = field(default_factory=list)  # heads merged (or fast-forwarded to)
    head: str = ""
    added: int = 0
    updated: int = 0
    removed: int = 0
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, its conflict copy)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (path, why ours stayed)
    pinned: list[str] = field(default_factory=list)  # pins the merge added here
    fetched: list[tuple[str, int]] = field(default_factory=list)  # pinned stubs brought back (path, bytes)
    unpinned: list[str] = field(default_factory=list)  # pins the merge removed here
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.conflicts or self.problems else 0


_SHARED = "which this root never made nor saw"  # in store.shared_id_problem's line


# -- the graph -----------------------------------------------------------------------------------
def parents_of(data: bytes) -> list[str]:
    """The parents a snapshot's verified stored bytes name (its header line only: no parse of
    100,000 entries to walk the graph)."""
    d = zlib.decompressobj()
    text = d.decompress(data, 1 << 20)
    line = text.split(b"\n", 2)[1]
    head = json.loads(line)
    parents = head.get("parents") if isinstance(head, dict) else None
    if not isinstance(parents, list) or not all(isinstance(p, str) and is_valid_oid(p) for p in parents):
        raise SnapshotError("bad parents")
    return parents


class Graph:
    """Parents and times of the snapshots known here (read from the index's verified cache)."""

    def __init__(self, ix: Index):
        self.ix = ix
        rows = ix.rows()
        self.times = {r[0]: r[1] for r in rows}
        self.machines = {r[0]: r[2] for r in rows}
        self._parents: dict[str, list[str]] = {}

    def known(self, sid: str) -> bool:
        # (no read of its bytes to learn that: in the history, cached or to be fetched again)
        return sid in self.times and (os.path.lexists(self.ix.cache_path(sid)) or self.ix._stored_size(sid) > 0)

    def parents(self, sid: str) -> list[str]:
        if sid not in self._parents:
            data = self.ix.bytes_of(sid, keep=False)
            self._parents[sid] = parents_of(data) if data is not None else []
        return self._parents[sid]

    def ancestors(self, sid: str) -> set[str]:
        """``sid`` and every snapshot it descends from that is known here."""
        seen, todo = set(), [sid]
        while todo:
            s = todo.pop()
            if s in seen or not self.known(s):
                continue
            seen.add(s)
            todo.extend(self.parents(s))
        return seen

    def base(self, ours: str, theirs: str) -> str | None:
        """The newest common ancestor (None: none known). A chain of theirs cut by a snapshot
        no remote holds any more (thinned by its machine's ``gc --keep``) is bridged: every
        snapshot a machine makes is a child of its HEAD then, and HEAD only moves forward, so
        a snapshot of ours made by that machine before the snapshot above the cut is an
        ancestor of it too (never a base guessed from times across machines)."""
        mine, their = self.ancestors(ours), self.ancestors(theirs)
        common = mine & their
        for c in their:
            if any(not self.known(p) for p in self.parents(c)):  # the chain is cut below c
                m, t = self.machines.get(c), self.times.get(c, 0)
                common |= {x for x in mine if m and self.machines.get(x) == m and self.times.get(x, 0) < t}
        if not common:
            return None
        return max(common, key=lambda s: (self.times.get(s, 0), s))


def _fetch_chain(root: Root, ix: Index, graph: Graph, remotes, sid: str, size: int, pm, session: Session) -> None:
    """Fetch ``sid`` and its parents until known ones; each kept in the index (not HEAD)."""
    todo = [(sid, size)]
    fetched = 0
    while todo:
        s, n = todo.pop()
        if graph.known(s):
            continue
        fetched += 1
        if fetched > MAX_CHAIN:
            raise SnapshotError(f"snapshot {sid[:19]}: more than {MAX_CHAIN} unknown ancestors; refused")
        try:
            data, snap = fetch_snapshot(root.jam_dir / "tmp", remotes, s, n, pm, session)
        except SnapshotAbsent:
            if s == sid:
                raise
            continue  # thinned there (gc --keep): the walk stops; Graph.base bridges the cut
        ix.add(snap, data, (0, 0, 0), make_head=False)
        graph.times[s] = snap.time_ns
        graph.machines[s] = snap.machine
        graph._parents[s] = list(snap.parents)
        todo.extend(zip(snap.parents, snap.parent_sizes, strict=True))


# -- the local side -------------------------------------------------------------------------------
def _stat(dfd: int | None, name: str):
    if dfd is None:
        return None
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is(dfd: int | None, name: str, item: Item | None) -> tuple[bool, os.stat_result | None]:
    """Whether what is at ``name`` is exactly ``item`` (None: nothing is there); with its lstat."""
    from jam_core.history.restore import _state

    st = _stat(dfd, name)
    if item is None:
        return st is None, st
    if st is None:
        return False, None
    # verify: "same" here lets sync remove or replace it (a stub written into with its stat put
    # back is the user's bytes, not the version a snapshot keeps)
    return _state(dfd, name, item, verify=True) == "same", st


def conflict_name(path: str, host: str, time_ns: int) -> str:
    """``dir/NAME (conflicted copy from HOST YYYY-MM-DD).EXT`` (Dropbox's form). HOST comes
    from a snapshot (input): only letters, digits, ``.``, ``_`` and ``-`` are kept."""
    parent, _, name = path.rpartition("/")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip(".-")[:40] or "another-computer"
    day = time.strftime("%Y-%m-%d", time.localtime(time_ns / 1e9))
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    tag = f" (conflicted copy from {safe} {day})"
    room = 250 - len(tag.encode()) - len(ext.encode()) - 1
    while len(stem.encode("utf-8", "surrogateescape")) > room:
        stem = stem[:-1]
    new = f"{stem}{tag}{'.' + ext if ext else ''}"
    return f"{parent}/{new}" if parent else new


class _Tree:
    """Directory descriptors of the root, opened without following symlinks, one at a time."""

    def __init__(self, root: Root):
        self.root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.leases = Leases()

    def lease(self, dfd: int, name: str) -> int | None:
        """A read lease on the regular file ``name``, held across its removal or replacement
        (invariant 11: a file some program holds open for writing is never removed or replaced,
        and one opened for writing meanwhile is put back). Its descriptor, or None for a
        symlink; raises FileBusy if it is open for writing."""
        try:
            fd = open_regular(dfd, name)
        except OSError:
            return None  # not a regular file (a symlink): nobody writes into it
        try:
            self.leases.take(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlease(self, fd: int | None) -> None:
        if fd is not None:
            self.leases.release(fd)
            os.close(fd)

    def intact(self, fd: int | None) -> bool:
        return fd is None or self.leases.intact(fd)

    def parent(self, rel: str) -> int | None:
        from jam_core.history.restore import _open_parent

        try:
            return _open_parent(self.root_fd, rel, create=False)
        except JamError:
            return None

    def close(self) -> None:
        self.leases.close()
        os.close(self.root_fd)


def _remove(tree: _Tree, rel: str, base: Item, out: SyncResult) -> bool:
    """Remove ``rel`` if it is exactly ``base``: renamed aside atomically, checked again, then
    unlinked (put back if it changed in that instant). True if it is gone."""
    dfd = tree.parent(rel)
    name = rel.rpartition("/")[2]
    try:
        ok, st = _is(dfd, name, base)
        if st is None:
            return True  # already gone
        if not ok:
            out.kept.append((rel, "deleted there, changed here: kept"))
            return False
        try:
            lease = tree.lease(dfd, name)
        except FileBusy:
            out.kept.append((rel, "deleted there, open for writing here: kept"))
            return False
        try:
            if not still_in(tree.root_fd, rel, dfd):  # its directory moved out of the root (invariant 7)
                out.kept.append((rel, "deleted there; its directory moved meanwhile: kept"))
                return False
            tmp = tmp_name()
            os.rename(name, tmp, src_dir_fd=dfd, dst_dir_fd=dfd)
            now = os.stat(tmp, dir_fd=dfd, follow_symlinks=False)
            changed = not same_file(now, st, ctime=False) or not tree.intact(lease)
            changed = changed or not still_in(tree.root_fd, rel, dfd)  # moved in that instant: it goes back
        finally:
            tree.unlease(lease)
        if changed:  # a rename moves the ctime: the inode, size, mtime; or opened for writing
            from jam_core.fs import rename_noreplace

            try:
                rename_noreplace(dfd, tmp, name)
            except FileExistsError:
                out.problems.append(f"{rel}: changed while being removed; kept as {tmp}")
                return False
            out.kept.append((rel, "changed while being removed: kept"))
            return False
        os.unlink(tmp, dir_fd=dfd)
        out.removed += 1
        return True
    finally:
        if dfd is not None:
            os.close(dfd)


def _prune_dirs(tree: _Tree, gone: list[str]) -> None:
    """The directories the removals left empty go too (an empty directory is in no snapshot,
    and left behind it would block a file of that name arriving from another machine); each
    one's parent opened without following symlinks, and rmdir removes only an empty one."""
    dirs = {p.rpartition("/")[0] for p in gone} - {""}
    for d in sorted(dirs, key=lambda d: -d.count("/")):
        while d:
            pfd = tree.parent(d)
            if pfd is None:
                break
            try:
                os.rmdir(d.rpartition("/")[2], dir_fd=pfd)
            except OSError:
                break
            finally:
                os.close(pfd)
            d = d.rpartition("/")[0]


# -- the merge -----------------------------------------------------------------------------------
def _same(a: Item | None, b: Item | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.same(b))


def merge(root: Root, ix: Index, ours: Snapshot, theirs: Snapshot, base: Snapshot | None, cat,
          out: SyncResult) -> dict[str, Item]:
    """Apply to the tree what changed from ``base`` to ``theirs`` and not here; returns the
    merged entries (what the tree should now hold)."""
    b = base.by_path() if base else {}
    o, t = ours.by_path(), theirs.by_path()
    merged = dict(o)
    adds: list[Item] = []
    replaces: dict[str, tuple[Item, os.stat_result | None]] = {}
    removes: list[tuple[str, Item]] = []

    def keep_theirs(p: str, ti: Item) -> None:
        """Both sides changed ``p``: ours stays, theirs arrives beside it as a conflict copy."""
        copy = conflict_name(p, theirs.host or theirs.machine, theirs.time_ns)
        try:
            check_rel(copy)
        except ValueError:
            out.problems.append(f"{p}: changed on both sides; no valid name for the conflict copy")
            return
        existing = o.get(copy)
        if existing is not None and existing.same(ti):
            out.conflicts.append((p, copy))  # already there (an earlier, interrupted sync)
            return
        if copy in o or copy in t or copy in merged:
            out.problems.append(f"{p}: changed on both sides and {copy} is taken; theirs not brought")
            return
        item = Item(copy, ti.kind, ti.oid, ti.size, ti.mode, ti.mtime_ns, ti.target)
        adds.append(item)
        merged[copy] = item
        out.conflicts.append((p, copy))

    for p in sorted(set(b) | set(o) | set(t)):
        bi, oi, ti = b.get(p), o.get(p), t.get(p)
        if _same(oi, ti) or _same(bi, ti):
            continue  # the same on both sides, or changed only here
        if _same(bi, oi):  # changed only there
            if ti is None:
                removes.append((p, oi))
                merged.pop(p, None)
            elif oi is None:
                adds.append(ti)
                merged[p] = ti
            else:
                replaces[p] = (ti, None)
                merged[p] = ti
        elif ti is None:
            out.kept.append((p, "deleted there, changed here: kept"))
        elif oi is None:
            adds.append(ti)  # deleted here, changed there: it comes back
            merged[p] = ti
        else:  # both changed, differently: theirs arrives beside ours
            keep_theirs(p, ti)
    # drop entries that would sit below a file (or a file below an entry) in the merge
    tree = _Tree(root)
    try:
        gone = []
        for p, oi in removes:
            if _remove(tree, p, oi, out):
                gone.append(p)
            else:
                merged[p] = oi
        if gone:
            cat.remove_stubs(gone)
            _prune_dirs(tree, gone)
        if replaces:
            # a file changed here that no commit saw (written into after the commit, a stub
            # written into, open for writing) stays; theirs then arrives beside it, as when
            # both sides changed it: recorded as ours alone, their edit would be in no tree
            for p in _replace(root, tree, ix, replaces, ours, merged, cat, out):
                keep_theirs(p, replaces[p][0])
    finally:
        tree.close()
    if adds:
        adds.sort(key=lambda i: i.path)
        problems: list[str] = []
        made = set(place(root, adds, lambda oid: _remotes_of(root, ix, oid), cat, problems))
        for i in adds:
            if i.path not in made:
                if o.get(i.path) is not None:
                    merged[i.path] = o[i.path]
                else:
                    merged.pop(i.path, None)
        out.added += len(made)
        blocked = [i for i in adds if i.path not in made]
        if blocked:  # a file here where theirs needs a directory, or the other way round
            problems, lost = _beside(root, ix, blocked, theirs, o, t, merged, cat, out, problems)
            out.problems += problems
            if lost:
                # Recorded as merged without them, the other machine's next sync would remove
                # its own copies (unchanged there since its commit): they would be in no tree.
                # Not merged: the next sync tries again (what was applied is the same on both
                # sides by then).
                raise JamError(f"{len(lost)} of its entries could not be made here (e.g. {lost[0]}); "
                               "the next sync tries again")
        else:
            out.problems += problems
    return merged


def _blocked_at(root: Root, path: str) -> str | None:
    """The part of ``path`` that the tree holds as something else (a file or symlink where a
    directory is needed, anything at the path itself), looked at without following symlinks."""
    parts = path.split("/")
    for n in range(1, len(parts) + 1):
        try:
            st = os.lstat(os.path.join(root.path, *parts[:n]))
        except FileNotFoundError:
            return None
        except OSError:
            return None
        if n == len(parts) or not stat.S_ISDIR(st.st_mode):
            return "/".join(parts[:n])
    return None


def _beside(root: Root, ix: Index, blocked: list[Item], theirs: Snapshot, o: dict[str, Item], t: dict[str, Item],
            merged: dict[str, Item], cat, out: SyncResult, problems: list[str]) -> tuple[list[str], list[str]]:
    """Entries of theirs that could not be made because the tree holds something else on
    their path (a file and a directory of one name, made on two machines) arrive beside it:
    the blocked part renamed as a conflict copy (a whole directory of theirs under one new
    name). Dropped from the merge instead, they would be removed from the other machine's
    tree by its next sync (unchanged there since its commit): in no tree at all. Returns the
    problems still to report and the paths of the entries that could not be brought either."""
    left: dict[str, str] = {}  # path -> its problem line
    for line in problems:
        left.setdefault(line.partition(":")[0], line)
    moved: list[Item] = []
    firsts: dict[str, str] = {}
    brought: set[str] = set()
    for i in blocked:
        part = _blocked_at(root, i.path)
        if part is None:
            continue  # not blocked by the tree (a failure said in its problem line)
        new = conflict_name(part, theirs.host or theirs.machine, theirs.time_ns) + i.path[len(part):]
        try:
            check_rel(new)
        except ValueError:
            continue
        mine = o.get(new)
        if mine is not None and mine.same(i):  # brought by an earlier, interrupted sync
            left.pop(i.path, None)
            merged[new] = mine
            out.conflicts.append((i.path, new))
            brought.add(i.path)
            continue
        if new in o or new in t or new in merged:
            continue
        moved.append(Item(new, i.kind, i.oid, i.size, i.mode, i.mtime_ns, i.target))
        firsts[new] = i.path
    if moved:
        again: list[str] = []
        made = set(place(root, moved, lambda oid: _remotes_of(root, ix, oid), cat, again))
        for m in moved:
            if m.path in made:
                merged[m.path] = m
                left.pop(firsts[m.path], None)
                out.conflicts.append((firsts[m.path], m.path))
                brought.add(firsts[m.path])
        out.added += len(made)
    return list(left.values()), [i.path for i in blocked if i.path not in brought]


def _remotes_of(root: Root, ix: Index, oid: str) -> list[str]:
    return sorted(ix.stored_on(oid)) or [r.name for r in root.remotes()]


def _replace(root: Root, tree: _Tree, ix: Index, replaces, ours: Snapshot, merged: dict[str, Item], cat,
             out: SyncResult) -> list[str]:
    """Each local file that is exactly ours (= the base) swapped for a stub of theirs: the
    stub is made aside, exchanged atomically, and the file that came out checked to be the
    one that was verified (exchanged back otherwise). Returns the paths left as they were
    (``merged`` records ours there)."""
    o = ours.by_path()
    checked: dict[str, os.stat_result] = {}
    for p in sorted(replaces):
        dfd = tree.parent(p)
        try:
            ok, st = _is(dfd, p.rpartition("/")[2], o[p])
        finally:
            if dfd is not None:
                os.close(dfd)
        if ok and st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            checked[p] = st
        else:
            out.kept.append((p, "changed there and here meanwhile: kept (sync again)"))
            merged[p] = o[p]

    def swap(dfd: int, tmp: str, name: str, item: Item) -> bool:
        rel = item.path
        before = _stat(dfd, name)
        if before is None or not same_file(before, checked[rel]):
            out.kept.append((rel, "changed while being replaced: kept"))
            merged[rel] = o[rel]
            return False
        try:
            lease = tree.lease(dfd, name)
        except FileBusy:
            out.kept.append((rel, "changed there, open for writing here: kept (sync again)"))
            merged[rel] = o[rel]
            return False
        try:
            if not still_in(tree.root_fd, rel, dfd):  # its directory moved out of the root meanwhile (invariant 7)
                out.kept.append((rel, "its directory moved while being replaced: kept (sync again)"))
                merged[rel] = o[rel]
                return False
            exchange(dfd, tmp, name)
            now = os.stat(tmp, dir_fd=dfd, follow_symlinks=False)
            changed = not same_file(now, checked[rel], ctime=False) or not tree.intact(lease)
        finally:
            tree.unlease(lease)
        if changed:  # the exchange moved its ctime; or it was opened for writing meanwhile
            exchange(dfd, tmp, name)  # it changed in the last instant: it goes back
            out.kept.append((rel, "changed while being replaced: kept"))
            merged[rel] = o[rel]
            return False
        os.unlink(tmp, dir_fd=dfd)
        out.updated += 1
        return True

    items = [replaces[p][0] for p in sorted(checked)]
    made: set[str] = set()
    if items:
        made = set(place(root, items, lambda oid: _remotes_of(root, ix, oid), cat, out.problems, rename=swap))
        gone = [p for p in made if merged.get(p) is not None and merged[p].kind != FILE]
        if gone:
            cat.remove_stubs(gone)
    kept = sorted(p for p in replaces if p not in made)
    for p in kept:  # not replaced (changed, busy, or not made: a problem said why): ours stays
        merged[p] = o[p]
    return kept


# -- pins ----------------------------------------------------------------------------------------
def merge_pins(ours, theirs, base) -> set[str]:
    """Pins merged three ways like files: pinned or unpinned on one side since the base -> as
    that side has it; with no common base, a pin either side has stays (the safe side: a pin
    only keeps a file from being stashed)."""
    o, t = set(ours), set(theirs)
    if base is None:
        return o | t
    b = set(base)
    merged = set()
    for p in b | o | t:
        if (p in o) == (p in t):
            keep = p in o
        elif (p in b) == (p in o):  # changed only there
            keep = p in t
        elif (p in b) == (p in t):  # changed only here
            keep = p in o
        else:  # pragma: no cover  (a pin is in or out: one side always agrees with the base)
            keep = True
        if keep:
            merged.add(p)
    return merged


def apply_pins(root: Root, ours, merged: set[str], out: SyncResult) -> set[str]:
    """Apply to the root's pins (``ROOT/.jam/pins``, under the root's lock) what the merge
    changed from our snapshot's pins: a delta over the pins now, so a ``jam pin`` made since
    our commit is kept. Returns the pins the merge records."""
    from jam_core.policy.pins import add_pins, read_pins, remove_pins

    now, o = read_pins(root), set(ours)
    add = sorted((merged - o) - now)
    drop = sorted((o - merged) & now)
    if add:
        add_pins(root, add)
        out.pinned += add
    if drop:
        remove_pins(root, drop)
        out.unpinned += drop
    return set(merged)


# -- sync ----------------------------------------------------------------------------------------
def sync(root: Root, pm, session: Session | None = None, message: str = "") -> SyncResult:
    """See the module's docstring."""
    from jam_core.catalog import Catalog
    from jam_core.history.store import commit
    from jam_core.ops.remotes import ensure_identity
    from jam_core.root import CATALOG

    session = session or Session()
    out = SyncResult()
    first = commit(root, pm, message, session=session)
    out.problems += first.problems
    out.problems += [f"{p}: {why}" for p, why in first.skipped]
    if not first.nothing:
        out.committed = first.id
    tree, me = tree_name(root), machine_id()
    remotes = durable_remotes(root)
    with root.lock(), Index(root) as ix, Catalog(root.jam_dir / CATALOG) as cat:
        heads: dict[str, int] = {}
        answered = []  # the remotes whose heads were read
        for remote in remotes:
            try:
                ensure_identity(root, remote, pm, session)
                for machine, (sid, size) in sorted(read_heads(remote, tree, pm, session).items()):
                    if machine != me:
                        heads.setdefault(sid, size)
                    elif not known_here(ix, sid):  # "our" head, written by another root: said, never skipped
                        out.problems.append(f"remote {remote.name!r}: {shared_id_problem(me, tree, sid)}")
                answered.append(remote)
            except (JamError, OSError) as exc:
                out.problems.append(f"remote {remote.name!r}: heads not read ({describe(exc)})")
        graph = Graph(ix)
        for sid, size in sorted(heads.items()):
            try:
                _fetch_chain(root, ix, graph, remotes, sid, size, pm, session)
            except (JamError, OSError) as exc:
                out.problems.append(f"head {sid[:19]}: not merged ({describe(exc)})")
                heads[sid] = 0
        recorder = _refer(root, ix, heads, answered, pm, session, out, graph)
        try:
            for sid in sorted((s for s, n in heads.items() if n), key=lambda s: (graph.times.get(s, 0), s)):
                ours_id = ix.head()
                if ours_id is None or sid == ours_id or sid in graph.ancestors(ours_id):
                    continue
                try:
                    _merge_one(root, ix, graph, ours_id, sid, cat, out)
                except (JamError, OSError) as exc:
                    out.problems.append(f"head {sid[:19]}: not merged ({describe(exc)})")
        finally:
            if recorder.pending:
                from jam_core.ops.refs import referenced

                out.problems += recorder.publish(referenced(root, cat), [r for r in answered
                                                                          if r.name in recorder.pending])
        from jam_core.hook.index import refresh

        refresh(root, cat)
    last = commit(root, pm, message or "sync", session=session)
    out.problems += last.problems
    said: set[str] = set()  # a head another root writes is said once per remote, not once per step
    kept = []
    for p in out.problems:
        if _SHARED in p:
            if p.partition(": ")[0] in said:
                continue
            said.add(p.partition(": ")[0])
        kept.append(p)
    out.problems = kept
    out.head = last.id
    fetch_pinned(root, pm, session, out)
    return out


def _refer(root: Root, ix: Index, heads: dict[str, int], remotes, pm, session: Session, out: SyncResult,
           graph: Graph | None = None):
    """Before any stub of another machine's snapshot is made here: record on every remote that
    answered (``refs``, pending) that this root refers to the objects of the heads about to be
    merged, as ``jam clone`` does, so that no root's removal (the other computer's ``jam gc
    --keep``, once it has moved on) takes them from under the new stubs. A head is not merged
    this time (a problem; the next sync merges it) if a remote could not record them, if
    another root is removing some of its objects at this moment, or if, the refs recorded, no
    remote holds one of its new objects (``store.absent``, asked live: a removal that ran
    wholly between the heads' read and the refs, or a head naming what was never stored): a
    stub of it could never come back. Returns the recorder (the caller publishes the full
    refs once the merges are done)."""
    from jam_core.ops.refs import Recorder

    recorder = Recorder(root, pm, session)
    wanted: dict[str, set[str]] = {}
    snaps: dict[str, Snapshot] = {}
    for sid in [s for s, n in heads.items() if n]:
        try:
            snaps[sid] = ix.load(sid)
            wanted[sid] = {i.oid for i in snaps[sid].items if i.kind == FILE and i.size}
        except (JamError, OSError) as exc:
            out.problems.append(f"head {sid[:19]}: not merged ({describe(exc)})")
            heads[sid] = 0
    every = set().union(*wanted.values()) if wanted else set()
    if not every:
        return recorder
    going: set[str] = set()
    for remote in remotes:
        try:
            recorder.before_store(remote, every)
            going |= recorder.removing_elsewhere(remote)
        except (JamError, OSError) as exc:
            for sid in wanted:
                heads[sid] = 0
            out.problems.append(f"remote {remote.name!r}: the objects of the other machines' snapshots could not be "
                                f"recorded there ({describe(exc)}); nothing merged")
            return recorder
    for sid, oids in wanted.items():
        if oids & going:
            heads[sid] = 0
            out.problems.append(f"head {sid[:19]}: not merged: another root is removing {len(oids & going)} of its "
                                "object(s) at this moment (run `jam sync` again)")
    # Only now, with the refs recorded, is what the remotes hold what the stubs can count on
    # (a removal that ran wholly between the heads' read and the refs is over by now): a head
    # one of whose new objects no remote holds is not merged (its stubs would be of nothing).
    head = ix.head()
    try:
        ours = {i.oid for i in ix.load(head).items if i.kind == FILE} if head else set()
    except (JamError, OSError):
        ours = set()
    done = (graph or Graph(ix)).ancestors(head) if head else set()  # merged already: nothing of theirs is made
    sizes = {}
    for sid in [s for s, n in heads.items() if n and s not in done]:
        sizes.update((i.oid, i.size) for i in snaps[sid].items if i.kind == FILE and i.size and i.oid not in ours)
    if sizes:
        from jam_core.history.store import absent

        try:
            gone = absent(remotes, sizes, pm, session)
        except (JamError, OSError) as exc:
            for sid in wanted:
                heads[sid] = 0
            out.problems.append(f"the remotes could not be asked whether they hold the other machines' objects "
                                f"({describe(exc)}); nothing merged")
            return recorder
        for sid in [s for s, n in heads.items() if n and s not in done]:
            lost = [i.path for i in snaps[sid].items if i.kind == FILE and i.oid in gone]
            if lost:
                heads[sid] = 0
                out.problems.append(f"head {sid[:19]}: not merged: no remote holds {len(lost)} of its file(s) "
                                    f"(e.g. {lost[0]}; removed by another computer's `jam gc`, or never stored)")
    return recorder


def fetch_pinned(root: Root, pm, session: Session, out: SyncResult) -> None:
    """Bring back the stubs under the root's pins (those that exist), as ``jam pin`` does:
    ``ops.checkout`` (verified, swapped only if the stub is unchanged). What could not come
    back is a problem (one line each); a dirty stub is kept as it is (said)."""
    from jam_core.ops.checkout import checkout
    from jam_core.policy.pins import read_pins

    try:
        rels = sorted(p for p in read_pins(root) if os.path.lexists(root.abs(p)))
    except (JamError, OSError) as exc:
        out.problems.append(f"pinned files not fetched: {describe(exc)}")
        return
    if not rels:
        return
    try:
        result = checkout(root, rels, pm, session)
    except (JamError, OSError) as exc:
        out.problems.append(f"pinned files not fetched: {describe(exc)}")
        return
    out.fetched += result.done
    out.problems += [f"pinned {path}: not fetched: {why}" for path, why in result.failed]
    out.kept += [(path, f"not fetched: {why}") for path, why in result.skipped]
    if result.aborted:
        out.problems.append(f"pinned files not fetched: {result.aborted}")


def _merge_one(root: Root, ix: Index, graph: Graph, ours_id: str, theirs_id: str, cat, out: SyncResult) -> None:
    ours, theirs = ix.load(ours_id), ix.load(theirs_id)
    base_id = graph.base(ours_id, theirs_id)
    base = ix.load(base_id) if base_id else None
    merged = merge(root, ix, ours, theirs, base, cat, out)
    pins = apply_pins(root, ours.pins, merge_pins(ours.pins, theirs.pins, base.pins if base else None), out)
    out.merged.append(theirs_id)
    if base_id == ours_id and {p: i for p, i in merged.items()} == theirs.by_path() \
            and pins == set(theirs.pins):
        # a fast-forward: theirs is now HEAD, no new snapshot
        ix.db.execute("INSERT OR REPLACE INTO meta VALUES ('head', ?)", (theirs_id,))
        ix.write_head_file(theirs_id)
        return
    snap = Snapshot([ours_id, theirs_id], max(time.time_ns(), ours.time_ns + 1, theirs.time_ns + 1),
                    socket.gethostname()[:255], machine_id(), ours.tree, "merge", sorted(pins),
                    sorted(merged.values(), key=lambda i: i.path),
                    parent_sizes=[ix.size_of(ours_id), ix.size_of(theirs_id)])
    stored = encode(snap)
    from jam_core.history.snapshot import changes

    a, m, d = changes(ours.by_path(), merged)
    ix.add(snap, stored, (len(a), len(m), len(d)), make_head=True)


__all__ = ["SyncResult", "sync", "merge", "conflict_name", "Graph", "parents_of", "UsageError"]

"""Stash: turn local files into stubs, only after their content is safe on the chosen remotes.

For each file: open it relative to its directory's descriptor (never through a symlink, never
blocking on a FIFO), take a read lease (a file open for writing is left alone), read and hash
it, let ``place`` choose remotes, let each remote's backend store and verify the object; once
a batch is stored, write the stubs beside their files, make them durable (one syncfs of the
root's filesystem, and of each other disk mounted inside it) and the remotes too (``sync``),
and exchange each stub with its file in one atomic ``renameat2(RENAME_EXCHANGE)``, only if
the file did not change meanwhile (size, mtime, inode, ctime, the lease). What was exchanged
out is then checked: if it is not the inode that was hashed, unchanged (a file saved over it
in the last instant, a chmod), it is exchanged back.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from jam_core.catalog import Catalog
from jam_core.daemon.client import SOCK_NAME, mark_new_stub
from jam_core.errors import IntegrityError, JamError, RemoteError, UsageError, describe
from jam_core.fs import (
    Closer,
    DirFds,
    FileBusy,
    Filesystems,
    Leases,
    NotCarried,
    NotTheFile,
    carried_xattrs,
    drop_inherited_acl,
    exchange,
    fd_path,
    open_regular_stat,
    raise_fd_limit,
    same_file,
    syncfs,
    tmp_name,
)
from jam_core.hook.index import begin as begin_index
from jam_core.hook.index import refresh as refresh_stubdirs
from jam_core.model import Remote, Session
from jam_core.objects import DEFAULT_ALGORITHM, hash_fd
from jam_core.ops import pipeline
from jam_core.ops.common import Result, collect, ends_as_interrupt
from jam_core.ops.pipeline import batches
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, STUB, Entry, new_stub_stamp
from jam_core.stub import HEADER_MAX, MAGIC, XATTR, BadStub, StubRecord, record_from_block, write_stub


class Skip(JamError):
    """This file stays as it is, for a reason the user should read (not an error)."""


@dataclass
class Stored:
    """A hashed file on its way: stored on ``targets``, then swapped for its stub.

    ``fd`` is the file itself, open read-only and leased from hashing to the swap; backends
    read it through ``fd_path(fd)``, so a name swapped meanwhile cannot redirect them."""

    entry: Entry
    st0: os.stat_result
    fd: int
    dir_fd: int
    record: StubRecord
    xattrs: dict[str, bytes]
    targets: list[str]  # the names of the remotes ``place`` chose
    stored_on: set[str] = field(default_factory=set)
    tmp: str = ""  # the stub, written aside in dir_fd
    stub_ino: int = 0  # its inode: tells whether an interrupted exchange was made (``_swap``)
    swapped: bool = False  # the stub took the file's place; ``fd`` holds the removed original

    @property
    def name(self) -> str:
        return self.entry.rel.rpartition("/")[2]


def stash(root: Root, rels: Iterable[str], pm, session: Session | None = None,
          explicit: bool = True, changed_after_ns: int | None = None, judged: dict[str, int] | None = None) -> Result:
    """Stash files and directories (relative to the root). Holds the root's lock throughout.

    ``explicit=False`` (policies chose) applies the minimum size to named files too and, under
    the lock, leaves pinned files alone (a pin may land between planning and stashing). Files go
    in batches: hash each, store the batch on its remotes (``stash_many`` where a backend
    offers it, else ``stash`` per file), write the stubs aside, make them durable (one syncfs)
    and the remotes (``sync``), then swap each file that did not change; one syncfs at the end
    makes the last swaps durable. ``changed_after_ns`` (a policy's plan): a file whose ctime is
    not before it changed after the plan looked at it, and stays; ``judged`` (the plan's
    ``{path: inode}``): a file at a named path that is not the inode the plan judged stays.
    """
    with ends_as_interrupt():  # a SIGTERM in the middle of a swap puts it back, as a Ctrl-C does
        if session is None:  # one of its own: closed here (what backends left for it is cleaned up)
            with Session() as own:
                return _stash(root, rels, pm, own, explicit, changed_after_ns, judged)
        return _stash(root, rels, pm, session, explicit, changed_after_ns, judged)


def _stash(root: Root, rels: Iterable[str], pm, session: Session, explicit: bool,
           changed_after_ns: int | None = None, judged: dict[str, int] | None = None) -> Result:
    result = Result()
    remotes = root.remotes()
    if not remotes:
        raise UsageError(f"{root.path} has no remote (add one with `jam remote add NAME URL`)")
    min_size = root.min_size
    raise_fd_limit()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        from jam_core.policy.pins import covered, read_pins

        behind = begin_index(root)  # a killed run left the cd index behind: all of it, at the end
        pins = set() if explicit else read_pins(root)
        todo, stubs = [], []
        _recover(remotes, pm, session)
        for entry, named in collect(root, dirs, rels, result):
            if entry.state == STUB and entry.record is not None:
                stubs.append(entry)
            why = _skip_reason(entry, named and explicit, min_size)
            if why is None and pins and covered(entry.rel, pins):
                why = "pinned"
            if why is None and changed_after_ns is not None and entry.st.st_ctime_ns >= changed_after_ns:
                why = "changed since the policies chose it; left for the next run"
            if why is None and judged is not None and judged.get(entry.rel, -1) not in (0, entry.st.st_ino):
                why = "not the file the policies chose (another one was moved there since); left for the next run"
            if why == "":
                result.unchanged += 1
            elif why:
                result.skipped.append((entry.rel, why))
            else:
                todo.append(entry)
        session.begin(2 * sum(e.st.st_size for e in todo))  # read and hash, then store
        from jam_core.ops.refs import Recorder
        from jam_core.placement import Candidates, copies_of

        # stubs the catalog has no row for (a stash killed between its swaps and its commit)
        known = cat.known_paths([e.rel for e in stubs]) if stubs else set()
        unknown = [e for e in stubs if e.rel not in known]
        recorder = Recorder(root, pm, session) if todo or unknown else None
        if unknown:
            _record_unknown(root, cat, unknown, remotes, pm, session, recorder, result)
        remotes = Candidates(remotes, copies_of(root.config), _free_space(remotes, pm, session) if todo else {})
        remotes.fixed = [] if _placement_is_fixed(pm, remotes) else None  # see choose_remotes
        if remotes.fixed is not None and any(e.st.st_size >= AHEAD_MIN for e in todo):
            try:  # known before the first id (the default placement ignores it): stash_ahead
                choose_remotes(root, pm, "", 0, remotes)
            except (JamError, OSError):
                remotes.fixed = None  # each file will hear why
        leases = Leases()
        session.adoption = leases  # a remote on the file's own disk may link it, not copy it
        # the originals' last closes free their blocks (waits on the disk, overlapped), most of
        # them once the stash's last stub is created (see Closer)
        closer = Closer(most=pipeline.closes_held(), most_bytes=pipeline.BATCH_BYTES)
        disks = Filesystems(dirs.root_fd)  # the root's, and any other disk mounted inside it
        unrecorded: set[str] = set()  # objects of stubs swapped in that the catalog could not record
        try:
            pipeline.run(
                batches(todo, lambda e: e.st.st_size),
                prepare=lambda batch: _hash_batch(root, batch, dirs, leases, remotes, pm, session, result),
                move=lambda hashed: _store_batch(root, hashed, remotes, pm, session, recorder),
                finish=lambda hashed, storing: _finish_batch(root, hashed, storing, pm, session, cat, result,
                                                             dirs, leases, closer, disks=disks,
                                                             unrecorded=unrecorded),
                stop=lambda: bool(result.aborted),
                session=session,
                cleanup=lambda hashed: _release(hashed, leases, dirs, closer),
            )
        finally:
            session.adoption = None
            leases.close()
            # Every original closed (its space free) before the stash returns, and before the
            # last syncfs, which then writes the frees too: on ext4 without a journal, inodes
            # freed in blocks not yet written are passed over by every new file of their group
            # for 5 minutes (each creation scans them), for 5 seconds once they are written.
            try:
                closer.stop()
            finally:  # interrupted while waiting for the frees: the swaps made are still synced
                if result.done:
                    _settle(disks, result)
                disks.close()
            # the index the cd hooks read: the marks this run can have moved (all if behind)
            refresh_stubdirs(root, cat, changed=None if behind else [rel for rel, _ in result.done])
            if recorder is not None and recorder.pending:
                used = [r for r in remotes if r.name in recorder.pending]
                from jam_core.ops.refs import referenced

                for problem in recorder.publish(referenced(root, cat) | unrecorded, used):
                    result.skipped.append((".", problem))
    return result


def _record_unknown(root: Root, cat: Catalog, unknown: list[Entry], remotes: list[Remote], pm, session: Session,
                    recorder, result: Result) -> None:
    """Record in the catalog the stubs it does not know, as `jam doctor --fix` would: this
    root's refs on their remotes list their objects first (a pending list now, the full refs
    when the stash ends), so that no other root's gc takes them for unused. A remote whose refs
    cannot be written: those stubs stay unknown (doctor says so)."""
    from jam_core.ops.remotes import ensure_identity

    by_name = {r.name: r for r in remotes}
    ok: dict[str, bool] = {}
    for name in {n for e in unknown for n in e.record.remotes}:
        remote = by_name.get(name)
        try:
            if remote is not None:
                ensure_identity(root, remote, pm, session)  # never refs written on another drive
                recorder.before_store(remote, sorted({e.record.oid for e in unknown if name in e.record.remotes}))
                ok[name] = True
        except (JamError, OSError):
            ok[name] = False
    rows = [e for e in unknown if all(ok.get(n, True) for n in e.record.remotes)]
    try:
        with cat.transaction():
            for e in rows:
                rec = e.record
                cat.add_stub(e.rel, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, rec.remotes)
    except sqlite3.Error as exc:
        result.skipped.append((".", f"the catalog cannot record {len(rows)} stub(s) it did not know: {describe(exc)}"))


def _recover(remotes: list[Remote], pm, session: Session) -> None:
    """Before anything is looked at, let each remote undo what a killed command left on it
    (``recover``): the objects a killed stash adopted and never settled (their files would look
    hard-linked), its stale uploads. Cheap where there is nothing (one listing of a dir remote's
    tmp/); a backend without it is not asked anything."""
    for remote in remotes:
        try:
            pm.hook.recover(remote=remote, session=session)
        except (JamError, OSError):
            pass  # its next upload tries again; a file it left linked is said to be hard-linked


def _settle(disks: Filesystems, result: Result) -> None:
    """Make the last swaps durable before the stash says it is done: one syncfs of the root's
    filesystem for the whole run (it was an fsync per directory per batch), and one of each
    other disk mounted inside the root that the stash wrote to."""
    try:
        for fd in disks.seen():
            syncfs(fd)
    except OSError as exc:
        result.aborted = result.aborted or f"the stubs may not be on the disk yet: {describe(exc)}"


def _free_space(remotes: list[Remote], pm, session: Session) -> dict[str, int | None]:
    """Bytes free on each remote of a tier that holds several (a pool); unreachable: None."""
    from collections import Counter

    from jam_core.placement import is_cache

    tiers = Counter(r.tier for r in remotes if not is_cache(r))
    free: dict[str, int | None] = {}
    for r in remotes:
        if tiers[r.tier] > 1 and not is_cache(r):
            try:
                free[r.name] = pm.hook.free_space(remote=r, session=session)
            except (JamError, OSError):
                free[r.name] = None
    return free


def _release(hashed: list[Stored], leases: Leases, dirs: DirFds, closer: Closer | None = None) -> None:
    """Remove the stubs left aside, close every file and let its directory go. The close of an
    original swapped out (already unlinked) frees its blocks: ``closer`` does those in the
    background, at the end of the stash (or once too many are held, after the next batch's
    stubs are created: ``_swap_batch`` flushes it)."""
    gone, nbytes = [], 0
    try:
        for s in hashed:
            if s.tmp:
                _unlink_quietly(s.dir_fd, s.tmp)
                s.tmp = ""
            if s.dir_fd >= 0:
                dirs.release(s.entry.dir)
                s.dir_fd = -1  # may be closed from now on: never used again
            if s.fd >= 0:
                leases.release(s.fd)
                if closer is not None and s.swapped:
                    gone.append(s.fd)
                    nbytes += s.entry.st.st_blocks * 512
                else:
                    os.close(s.fd)
                s.fd = -1
    finally:
        if closer is not None:
            closer.hold(gone, nbytes)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _hash_batch(root: Root, entries: list[Entry], dirs: DirFds, leases: Leases, remotes: list[Remote], pm,
                session: Session, result: Result) -> list[Stored]:
    hashed: list[Stored] = []
    for entry in entries:
        try:
            s = hash_and_place(root, entry, dirs, leases, remotes, pm, session)
        except Skip as exc:
            result.skipped.append((entry.rel, str(exc)))
            result.partly = True
            session.file_done(2 * entry.st.st_size)
            continue
        except (JamError, OSError) as exc:
            result.failed.append((entry.rel, describe(exc)))
            session.file_done(2 * entry.st.st_size)
            continue
        if s is None:
            result.skipped.append((entry.rel, "changed while it was being stashed; left local"))
            result.partly = True
            session.file_done(2 * entry.st.st_size)
            continue
        hashed.append(s)
    return hashed


def _store_batch(root: Root, hashed: list[Stored], remotes: list[Remote], pm, session: Session,
                 recorder=None):
    """In the worker: store a hashed batch on each remote ``place`` chose, in the configured
    order, the edge caches last. Before storing on a remote, records there that this root
    refers to the batch's objects (``refs``). Records on each item the remotes that reported a
    verified store; returns the errors by item and the remotes used; raises RemoteError when a
    remote that is not a cache fails as a whole (a cache that fails is skipped)."""
    from jam_core.ops.remotes import ensure_identity
    from jam_core.placement import is_cache

    errors: dict[int, Exception] = {}
    used: dict[str, Remote] = {}
    for remote in sorted(remotes, key=is_cache):
        items = [s for s in hashed if remote.name in s.targets and id(s) not in errors]
        if not items:
            continue
        try:
            ensure_identity(root, remote, pm, session)
            if recorder is not None:
                recorder.before_store(remote, (s.record.oid for s in items))
            stored = list(store_on(remote, items, pm, session))
            going = recorder.removing_elsewhere(remote) if recorder is not None else set()
        except RemoteError:
            if is_cache(remote):
                continue
            raise
        used[remote.name] = remote
        for s, err in stored:
            if err is None and s.record.oid in going:
                # Another root wrote, before reading the refs, that it is removing this object
                # from this remote: our refs may have come too late for it. Never swap on it.
                err = JamError(f"another root is removing {s.record.oid} from remote {remote.name!r} "
                               "at this moment; left local (stash it again)")
            if err is not None:
                if not is_cache(remote):
                    errors[id(s)] = err
            else:
                s.stored_on.add(remote.name)
    return errors, used


def _finish_batch(root: Root, hashed: list[Stored], storing, pm, session: Session, cat: Catalog,
                  result: Result, dirs: DirFds, leases: Leases, closer: Closer | None = None,
                  *, disks: Filesystems, unrecorded: set[str]) -> None:
    """Wait for a batch's store, then swap every file whose every chosen remote holds it."""
    try:
        errors, used = storing.result()
    except RemoteError as exc:
        result.aborted = result.aborted or str(exc)  # the first cause is the one to tell
        return
    from dataclasses import replace

    from jam_core.placement import is_cache

    caches = {r.name for r in used.values() if is_cache(r)} | {n for n in _cache_names(root)}
    stored = []
    for s in hashed:
        session.file_done(2 * s.record.size)
        err = errors.get(id(s))
        missing = [n for n in s.targets if n not in s.stored_on and n not in caches]
        s.record = replace(s.record, remotes=tuple(n for n in s.targets if n in s.stored_on))
        if err is None and missing:  # never swap on the word of a remote that did not store it
            err = RemoteError(f"not stored on {', '.join(repr(n) for n in missing)}; left local")
        if err is None:
            stored.append(s)
        elif isinstance(err, IntegrityError):
            result.skipped.append((s.entry.rel, str(err)))
            result.partly = True
        else:
            result.failed.append((s.entry.rel, describe(err)))
    if stored:
        _swap_batch(root, stored, used.values(), pm, session, cat, result, dirs, leases, closer, disks=disks,
                    unrecorded=unrecorded)


def store_on(remote: Remote, items: list[Stored], pm, session: Session) -> Iterator[tuple[Stored, Exception | None]]:
    """Store ``items`` on ``remote``; yields each with None (stored and verified) or its error.

    Raises RemoteError when the remote as a whole fails (unreachable, gone, no backend).
    """
    by_oid: dict[str, list[Stored]] = {}
    for s in items:
        by_oid.setdefault(s.record.oid, []).append(s)  # equal content is stored once
    gate = session.adoption
    if gate is not None:  # the others would be swapped on an object still another file's inode: copied
        for group in by_oid.values():
            if len(group) > 1:
                gate.refuse(group[0].fd)
    unique = [(oid, Path(fd_path(group[0].fd)), group[0].record.size) for oid, group in by_oid.items()]
    many = pm.hook.stash_many(remote=remote, items=unique, session=session)
    if many is not None:
        for oid, err in many:
            for s in by_oid.pop(oid, ()):
                yield s, err
        for group in by_oid.values():  # a backend that forgot some: never trust them as stored
            for s in group:
                yield s, RemoteError(f"remote {remote.name!r} did not report storing {s.record.oid}")
        return
    for oid, source, size in unique:
        try:
            ok = pm.hook.stash(remote=remote, oid=oid, source=source, size=size, session=session)
        except RemoteError:
            raise
        except (JamError, OSError) as exc:  # this file's problem: the others go on
            ok = exc
        if ok is None:
            raise RemoteError(f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}")
        err = None if ok is True else ok if isinstance(ok, Exception) else \
            RemoteError(f"remote {remote.name!r} did not store {oid}")
        for s in by_oid[oid]:
            yield s, err


def _swap_batch(root: Root, batch: list[Stored], remotes, pm, session, cat: Catalog, result: Result,
                dirs: DirFds, leases: Leases, closer: Closer | None = None,
                *, disks: Filesystems, unrecorded: set[str]) -> None:
    """Write a batch's stubs aside, make them and the batch's objects durable (one syncfs of
    the root's filesystem and one of each other disk mounted inside the root that holds one of
    them, then one ``sync`` per remote: a remote on the same disk finds nothing left to flush),
    then swap them in one by one. Nothing is swapped unless all of
    those succeeded. Every file is its own success or failure: one unwritable directory fails
    only its files. The swaps become durable with the next batch's syncfs, or the one that
    ends the stash (``_settle``). A catalog that cannot record a stub swapped in (the disk
    full) stops the stash: that file is stashed all the same, and said to be (``unrecorded``:
    its object stays in the refs; `jam doctor --fix` records it in the catalog)."""
    ready = []
    for s in batch:
        try:
            s.tmp = write_stub_aside(s)
            ready.append(s)
        except OSError as exc:
            result.failed.append((s.entry.rel, describe(exc)))
    if closer is not None:  # the originals held so far: freed now if too many, beside this batch's syncfs and swaps
        closer.flush()
    if not ready:
        return
    try:
        for fd in disks.of(s.dir_fd for s in ready):
            syncfs(fd)
        for remote in remotes:
            pm.hook.sync(remote=remote, session=session)
        ready = _link_adopted(ready, leases, disks, result)
    except (RemoteError, OSError) as exc:
        result.aborted = describe(exc)
        return  # the stubs written aside are removed by _release
    daemon = (root.jam_dir / SOCK_NAME).exists()  # a `jam daemon` serves the root: it marks new stubs
    moved = {d for d in {s.entry.dir for s in ready} if not dirs.still_there(d)}
    made: list[str] = []  # the objects of this batch's stubs swapped in (a failed commit loses their rows)
    try:
        with cat.transaction(keep_on_error=True):  # one commit per batch, not per file
            _swap_all(root, ready, daemon, moved, cat, result, leases, made, unrecorded)
    except sqlite3.Error as exc:  # the commit (or the BEGIN): none of this batch's rows may be recorded
        unrecorded.update(made)
        _not_recorded(result, exc, len(made))


def _link_adopted(ready: list[Stored], leases: Leases, disks: Filesystems, result: Result) -> list[Stored]:
    """The files a remote on their own disk adopts are linked into it only now, once everything
    else of the batch is durable: a stash that failed before leaves them as they were. One more
    syncfs makes the links durable before any swap (the object before its stub). Returns the
    files still to swap: one whose link could not be made (changed, or refused) stays local."""
    if not leases.pending():
        return ready
    out, linked = [], False
    for s in ready:
        try:
            got = leases.link(s.fd)
        except (JamError, OSError) as exc:  # no object for it: neither linked nor copied
            result.failed.append((s.entry.rel, f"{describe(exc)}; left local"))
            continue
        if got is False:
            result.skipped.append((s.entry.rel, "changed while it was being stashed; left local"))
            result.partly = True
            continue
        linked = linked or got is True
        out.append(s)
    if linked:
        for fd in disks.of(s.dir_fd for s in out):
            syncfs(fd)
    return out


def _not_recorded(result: Result, exc: Exception, n: int) -> None:
    if n:
        result.aborted = result.aborted or (
            f"the catalog cannot record what was stashed ({describe(exc)}); the files said stashed are "
            "stubs, their content on the remotes: free some space, then run `jam doctor --fix` so the "
            "catalog knows them")
    else:
        result.aborted = result.aborted or describe(exc)


def _swap_all(root: Root, ready: list[Stored], daemon: bool, moved: set[str], cat: Catalog, result: Result,
              leases: Leases, made: list[str], unrecorded: set[str]) -> None:
    """Swap each file of ``ready`` for its stub and record it in the catalog (in the caller's
    transaction); ``made``: the objects of the stubs swapped in."""
    for s in ready:
        e = s.entry
        if e.dir in moved:  # its directory left the root (or was replaced) since it was opened
            result.skipped.append((e.rel, "its directory was moved or replaced while it was being stashed; "
                                   "left as it is"))
            result.partly = True
            continue
        try:
            if daemon:
                mark_new_stub(root.path, s.dir_fd, s.tmp)  # before the rename: hydrates from its first instant
            swapped = _swap(s, leases)
        except OSError as exc:
            result.failed.append((e.rel, describe(exc)))
            continue
        if not swapped:
            result.skipped.append((e.rel, "changed while it was being stashed; left local"))
            result.partly = True
            continue
        rec = s.record
        made.append(rec.oid)
        result.done.append((e.rel, max(0, e.st.st_blocks * 512 - HEADER_MAX)))  # a stub now, whatever follows
        ino, ctime = new_stub_stamp(s.dir_fd, s.name, s.record)  # vouched for only if still clean
        try:
            cat.add_stub(e.rel, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, rec.remotes,
                         ino=ino, ctime_ns=ctime)
        except sqlite3.Error as exc:  # the disk full: no more swaps (nothing more could be recorded)
            unrecorded.add(rec.oid)
            _not_recorded(result, exc, len(made))
            return


def _skip_reason(entry: Entry, explicit: bool, min_size: int) -> str | None:
    """None: stash it. "": already a stub (nothing to do). Otherwise the reason it stays."""
    if entry.state == STUB:
        return ""
    if entry.state == DIRTY:
        return "a stub that was written into; jam keeps it as it is (see `jam doctor`)"
    if entry.state == BAD:
        return f"unreadable stub metadata: {entry.problem}"
    assert entry.state == LOCAL
    st = entry.st
    if st.st_nlink > 1:
        return f"hard-linked ({st.st_nlink} links); stashing would break the links"
    if st.st_size == 0:
        return "empty"
    if not -(1 << 63) <= st.st_mtime_ns < 1 << 63:  # what a stub records (int64 nanoseconds)
        return "dated past 2262-04-11 (or before 1677), which a stub cannot record; give it a real date to stash it"
    if not explicit and st.st_size < min_size:
        return f"smaller than core.min_size ({st.st_size} bytes)"
    return None


def _cache_names(root: Root) -> set[str]:
    from jam_core.placement import is_cache

    return {r.name for r in root.remotes() if is_cache(r)}


def choose_remotes(root: Root, pm, oid: str, size: int, remotes: list[Remote]) -> list[str]:
    """The names of the remotes ``place`` chose (each a configured remote, each once). With
    ``[place] copies = N``, fewer than N chosen remotes that are not caches leave the file local
    (Skip). ``remotes`` may carry the command's copies and free space (placement.Candidates);
    the free space of the remotes chosen is lowered by ``size``, so a pool fills evenly."""
    from jam_core.placement import is_cache

    fixed = getattr(remotes, "fixed", None)
    if fixed:  # the one answer of the default placement for this command (_placement_is_fixed)
        return list(fixed)
    copies = getattr(remotes, "copies", 1)
    free = getattr(remotes, "free", {})
    chosen = pm.hook.place(root=root.path, oid=oid, size=size, remotes=remotes, copies=copies, free=dict(free))
    names = {r.name for r in remotes}
    if not chosen or any(getattr(r, "name", None) not in names for r in chosen):
        raise UsageError("the place hook chose no configured remote")
    out = list(dict.fromkeys(r.name for r in chosen))
    by_name = {r.name: r for r in remotes}
    durable = {by_name[n].options.get("id") or n for n in out if not is_cache(by_name[n])}  # stores, not names
    if len(durable) < copies:
        raise Skip(f"[place] copies = {copies}, but only {len(durable)} remote(s) that are not caches "
                   "were chosen; left local (add remotes or lower copies)")
    for n in out:
        if free.get(n) is not None:
            free[n] = max(0, free[n] - size)
    if fixed is not None:
        remotes.fixed = list(out)
    return out


def _placement_is_fixed(pm, remotes) -> bool:
    """True where ``place`` gives every object of this command the same answer: only the
    core's default placement is installed, ``[place] copies = 1``, no tier holds several remotes
    (a pool, chosen by free space) and no remote is a cache. Then it is asked for the first
    object only and its answer reused (a call through pluggy per file cost 0.14 ms: 0.28 s of
    a 2,000-file stash). Any ``place`` plugin, more copies, a pool or a cache: asked per object."""
    from collections import Counter

    from jam_core.placement import is_cache

    try:
        impls = pm.hook.place.get_hookimpls()
    except AttributeError:
        return False
    if [i.plugin_name for i in impls] != ["jam_core.placement"] or getattr(remotes, "copies", 1) != 1:
        return False
    if any(is_cache(r) for r in remotes):
        return False
    return all(n == 1 for n in Counter(r.tier for r in remotes).values())


def hash_and_place(root: Root, entry: Entry, dirs: DirFds, leases: Leases, remotes: list[Remote], pm,
                   session: Session) -> Stored | None:
    """Open, lease and hash a file, and let ``place`` choose its remotes. None if it changed
    since the scan; raises Skip for a file that must stay as it is (open for writing, a copy
    of a stub). On success the returned Stored owns the open, leased descriptor, and holds its
    directory's in ``dirs`` (``_release`` lets it go)."""
    dir_fd = dirs.hold(entry.dir)
    try:
        s = _hash_and_place(root, entry, dir_fd, leases, remotes, pm, session)
    except BaseException:
        dirs.release(entry.dir)
        raise
    if s is None:
        dirs.release(entry.dir)
    return s


def _hash_and_place(root: Root, entry: Entry, dir_fd: int, leases: Leases, remotes: list[Remote], pm,
                    session: Session) -> Stored | None:
    name = entry.rel.rpartition("/")[2]
    try:
        fd, st0 = open_regular_stat(dir_fd, name, expect=entry.st)
    except (NotTheFile, FileNotFoundError):
        return None
    try:
        if not same_file(st0, entry.st):
            raise _Changed
        try:
            leases.take(fd)
        except FileBusy as exc:
            raise Skip(f"{exc.strerror}; left local") from None
        if _carries_record(fd):  # the scans read no xattr of a writable, non-sparse file
            raise Skip("a stub that was written into (it still carries its record); jam keeps it as it is, and "
                       "its stashed content on the remotes (see `jam doctor`, `jam checkout --keep-both`)")
        head = os.pread(fd, HEADER_MAX, 0)
        if head.startswith(MAGIC):
            try:
                copy = record_from_block(head, st0.st_size)
            except BadStub as exc:
                raise Skip(f"starts like a jam stub header that cannot be trusted ({exc}); left local") from None
            if copy is not None:
                raise Skip("a copy of a jam stub that lost its xattrs, not content: `jam checkout` it "
                           "(or `jam doctor --fix` restores its metadata)")
        if st0.st_size >= AHEAD_MIN and getattr(remotes, "fixed", None):
            _stash_ahead(fd, st0.st_size, remotes, pm, session)
        # No read past the size it had (a file that grew is caught below by its stat), so a
        # small file costs one read, not a second one that finds its end.
        oid, size = hash_fd(fd, DEFAULT_ALGORITHM, session.progress, limit=st0.st_size)
        if size != st0.st_size or not same_file(os.fstat(fd), st0) or not leases.intact(fd):
            raise _Changed
        try:
            xattrs = carried_xattrs(fd)
        except NotCarried as exc:
            raise Skip(f"has {exc} (capabilities or a trusted.* xattr), which a stub cannot carry "
                       "safely (its metadata is its owner's to write); left local") from None
        targets = choose_remotes(root, pm, oid, size, remotes)
    except _Changed:
        leases.release(fd)
        os.close(fd)
        return None
    except BaseException:
        leases.release(fd)
        os.close(fd)
        raise
    rec = StubRecord(oid=oid, size=size, mode=st0.st_mode & 0o7777, mtime_ns=st0.st_mtime_ns,
                     remotes=tuple(targets), stashed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return Stored(entry, st0, fd, dir_fd, rec, xattrs, targets)


def _carries_record(fd: int) -> bool:
    """Whether the open file still carries a stub's record (``user.jam``): a stub written into in
    full, in place, looks like any file to a scan's stat. Stashed as one, its row would name
    the new bytes and the stashed original's object would be left to gc (invariant 5)."""
    try:
        os.getxattr(fd, XATTR)
    except OSError as exc:
        return exc.errno not in (errno.ENODATA, errno.ENOTSUP)  # unreadable: not stashed either
    return True


AHEAD_MIN = 64 << 20  # from this size on, the backends may start copying while the core hashes


def _stash_ahead(fd: int, size: int, remotes, pm, session: Session) -> None:
    """Let the backends of the remotes already chosen (``remotes.fixed``) start copying the
    file while it is hashed here (the ``stash_ahead`` hook): the copy and its own hash overlap
    this hash, and the disk starts writing sooner. Best effort: a failure only means the copy
    is made after the hash, as for any other file."""
    by_name = {r.name: r for r in remotes}
    for name in remotes.fixed:
        try:
            pm.hook.stash_ahead(remote=by_name[name], source=Path(fd_path(fd)), size=size, session=session)
        except (JamError, OSError, KeyError):
            pass


class _Changed(Exception):
    pass


def write_stub_aside(s: Stored) -> str:
    """Write the stub of ``s`` to a temporary name in its directory (not yet durable)."""
    st0 = s.st0
    tmp = tmp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=s.dir_fd)
    try:
        new = os.fstat(fd)
        s.stub_ino = new.st_ino
        # Compared with what the new file got, not with jam's own ids: in a setgid directory it
        # takes the directory's group.
        if (new.st_uid, new.st_gid) != (st0.st_uid, st0.st_gid):
            os.fchown(fd, st0.st_uid, st0.st_gid)
        drop_inherited_acl(fd)  # a directory's default ACL is not the file's
        write_stub(fd, s.record, s.name, st0.st_atime_ns, s.xattrs, durable=False)
    except BaseException:
        os.close(fd)
        _unlink_quietly(s.dir_fd, tmp)
        raise
    os.close(fd)
    return tmp


def _swap(s: Stored, leases: Leases) -> bool:
    """Exchange the stub (at ``s.tmp``) with the file, if the file is still the one stored.

    After the exchange, what went out must be the very inode that was hashed, unchanged and
    still leased; if anything else was there (saved over it in the last instant), it is
    exchanged back and keeps its name. True if the file is now a stub.
    """
    try:
        now = os.stat(s.name, dir_fd=s.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    # A backend that adopted the file (linked it as its object: Leases.adopt) moved its ctime
    # and link count: what it saw then is what must still be there. Any other name made since
    # (a hard link) could write into the object: no swap.
    want = leases.adopted(s.fd) or s.st0
    if not same_file(now, want) or now.st_nlink != want.st_nlink or not leases.intact(s.fd):
        return False
    try:
        try:
            exchange(s.dir_fd, s.tmp, s.name)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(exc.errno, "this filesystem cannot exchange two names atomically "
                              "(renameat2 RENAME_EXCHANGE); jam will not swap files on it") from None
            raise
        out = os.stat(s.tmp, dir_fd=s.dir_fd, follow_symlinks=False)
        held = os.fstat(s.fd)
        # A chmod, chown or setfacl in the last instant breaks no lease and moves no mtime: the
        # mode, owner and xattrs (ACLs) are checked too (the stub records them; a file made
        # private stays so).
        if ((out.st_ino, out.st_dev) != (held.st_ino, held.st_dev) or held.st_size != s.st0.st_size
                or held.st_mtime_ns != s.st0.st_mtime_ns or held.st_mode != s.st0.st_mode
                or (held.st_uid, held.st_gid) != (s.st0.st_uid, s.st0.st_gid) or held.st_nlink != want.st_nlink
                or not leases.intact(s.fd) or _xattrs_now(s.fd) != s.xattrs):
            exchange(s.dir_fd, s.tmp, s.name)  # put back what was there: the stub returns to tmp
            return False
        os.unlink(s.tmp, dir_fd=s.dir_fd)  # the original: its content is on the remotes
    except BaseException:
        _put_back(s)  # interrupted (Ctrl-C) in the middle: what was at the name returns to it
        raise
    s.tmp = ""
    # Let the lease go only now that the original has no name in the tree (a writer could open
    # it by its temporary name). An adopted original must be its object's one name left.
    leases.release(s.fd, kept=want is not s.st0 and os.fstat(s.fd).st_nlink == 1)
    s.swapped = True  # its blocks are freed by the last close (``_release``)
    return True


def _xattrs_now(fd: int) -> dict[str, bytes] | None:
    """What the stub of ``fd`` would carry now (None: something it cannot carry)."""
    try:
        return carried_xattrs(fd)
    except NotCarried:
        return None


def _put_back(s: Stored) -> None:
    """After an exchange interrupted before its checks ended (a Ctrl-C as it returned): if the
    temporary name no longer holds the stub, the exchange was made and what was at the file's
    name (the original, or a file saved over it in the last instant) is there: exchange it
    back, so that ``_release``, which unlinks the temporary name, removes only the stub."""
    try:
        at_tmp = os.stat(s.tmp, dir_fd=s.dir_fd, follow_symlinks=False)
    except OSError:
        return  # unlinked: the original, once checked (the swap was complete)
    if at_tmp.st_ino != s.stub_ino:
        try:
            exchange(s.dir_fd, s.tmp, s.name)
        except OSError:
            s.tmp = ""  # it cannot go back: left where it is (never unlinked), for `jam doctor` to show
            raise

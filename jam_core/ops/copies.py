"""Where each file's content is, and copies between remotes: ``where``, ``copy``, ``move``,
``drop``; and the one guarded removal every path that removes a copy goes through
(:func:`remove_copies`: drop, move, gc, edge expiry, remote remove).

Invariant 12: under the root's lock, before removing object X from remote R, this root writes
on R that it is about to remove X (``refs.Recorder.intent``), then reads live what every root
that uses R refers to, and asks the other remotes live whether they hold X (hashing it in place
where the backend can, else ``has``). X goes only if no root refers to it on R, or every root
that does still has enough copies elsewhere (its ``[place] copies``), counting only remotes that
root uses and copies no other root is about to remove. No flag bypasses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from jam_core.catalog import Catalog
from jam_core.errors import JamError, RemoteError, UsageError, describe
from jam_core.fs import DirFds, fd_path
from jam_core.model import Remote, Session
from jam_core.objects import hash_fd, split_oid
from jam_core.ops.common import Result, collect
from jam_core.ops.refs import Recorder, Users, referenced, users
from jam_core.placement import copies_of, durable
from jam_core.root import CATALOG, Root
from jam_core.scan import DIRTY, STUB


def _about_to_remove(remote: Remote, oid: str) -> None:
    """The instant between the last check and a removal (tests inject faults here)."""


def _remote(root: Root, name: str) -> Remote:
    for r in root.remotes():
        if r.name == name:
            return r
    raise UsageError(f"no remote named {name!r} (see `jam remote list`)")


def _stubs(root: Root, dirs: DirFds, rels: Iterable[str], result: Result) -> list:
    """The stubs (dirty ones too) under the named paths; local files are skipped with why."""
    out = []
    for entry, named in collect(root, dirs, rels, result):
        if entry.state in (STUB, DIRTY) and entry.record is not None:
            out.append(entry)
        elif named:
            result.skipped.append((entry.rel, "not stashed (a local file): nothing on the remotes to act on"))
    return out


# -- where ---------------------------------------------------------------------------------------

@dataclass
class Where:
    path: str
    oid: str
    size: int
    known: list[str]  # remotes the catalog or the stub says hold it
    live: dict[str, str] = field(default_factory=dict)  # with check: remote -> yes / no / unreachable: ...


def where(root: Root, rels: Iterable[str], pm, check: bool = False, session: Session | None = None
          ) -> tuple[list[Where], Result]:
    result = Result()
    session = session or Session()
    remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
    out: list[Where] = []
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        entries = _stubs(root, dirs, rels, result)
        known = cat.remotes_of(e.record.oid for e in entries)
        down: dict[str, str] = {}
        for e in entries:
            rec = e.record
            names = sorted(known[rec.oid] | set(rec.remotes), key=lambda n: (
                next((r.tier for r in remotes if r.name == n), 1 << 30), n))
            w = Where(e.rel, rec.oid, rec.size, names)
            if check:
                for r in remotes:
                    if r.name in down:
                        w.live[r.name] = down[r.name]
                        continue
                    try:
                        _identity(root, r, pm, session)
                        w.live[r.name] = "yes" if _verified(r, rec.oid, rec.size, pm, session) else "no"
                    except (JamError, OSError) as exc:
                        down[r.name] = w.live[r.name] = f"unreachable: {describe(exc)}"
                w.known = [n for n, v in w.live.items() if v == "yes"]
            out.append(w)
    return out, result


def _identity(root: Root, remote: Remote, pm, session: Session) -> None:
    from jam_core.ops.remotes import ensure_identity

    ensure_identity(root, remote, pm, session)


def _verified(remote: Remote, oid: str, size: int, pm, session: Session) -> bool:
    """Does ``remote`` hold an intact copy of ``oid``, asked live? Hashed in place where the
    backend can (``hash_object``), else its size (``has``). Once per command and copy."""
    key = ("jam.copies.verified", remote.name, oid)
    if key in session.cache:
        return session.cache[key]
    got = pm.hook.hash_object(remote=remote, oid=oid, size=size, session=session)
    if got is None:
        got = pm.hook.has(remote=remote, oid=oid, size=size, session=session)
        if got is None:
            raise RemoteError(f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}")
        ok = got is True
    else:
        ok = got == oid
    session.cache[key] = ok
    return ok


# -- the guarded removal -------------------------------------------------------------------------

def remove_copies(root: Root, cat: Catalog, pm, session: Session, remote: Remote, wanted: dict[str, int],
                  own: set[str], recorder: Recorder | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """Remove from ``remote`` the objects of ``wanted`` (oid -> size) that may go; ``own`` is
    what this root refers to. The caller holds the root's lock. Returns (removed, refused with
    why). Never removes on "unknown": an unreachable remote counts no copy."""
    removed: dict[str, int] = {}
    refused: dict[str, str] = {}
    if not wanted:
        return removed, refused
    recorder = recorder or Recorder(root, pm, session)
    _identity(root, remote, pm, session)
    recorder.intent(remote, wanted)
    try:
        here = users(remote, pm, session)
        others: list[tuple[Remote, Users]] = []
        for r in durable(root.remotes()):
            if r.name == remote.name:
                continue
            try:
                _identity(root, r, pm, session)
                others.append((r, users(r, pm, session)))
            except (JamError, OSError):
                continue  # unreachable: holds no copy that can be counted
        for oid, size in wanted.items():
            needing = dict(here.needing(oid))
            needing.pop(recorder.rid, None)  # this root's own need is read live, not from its refs
            if oid in own:
                needing[recorder.rid] = recorder.copies
            why = _short_of(oid, size, needing, others, recorder.rid, pm, session)
            if why:
                refused[oid] = why
                continue
            _about_to_remove(remote, oid)
            try:
                pm.hook.remove(remote=remote, oid=oid, session=session)
            except (JamError, OSError) as exc:
                refused[oid] = describe(exc)
                if isinstance(exc, RemoteError):
                    break
                continue
            removed[oid] = size
            cat.forget_location(oid, remote.name)
    finally:
        try:
            recorder.intent(remote, ())
        except (JamError, OSError):
            pass  # a stale intent only makes other roots count fewer copies: safe
    return removed, refused


def _short_of(oid: str, size: int, needing: dict[str, int], others, me: str, pm, session: Session) -> str:
    """Why ``oid`` may not leave (a root would have too few copies left), or "" if it may."""
    for rid, want in needing.items():
        want = max(want, 1)
        have = 0
        for r, u in others:
            if rid != me and rid not in u.refs:
                continue  # that root does not use this remote: its copy there is no copy for it
            if u.being_removed(oid, but=me):
                continue  # another root is removing that copy right now
            try:
                if _verified(r, oid, size, pm, session):
                    have += 1
            except (JamError, OSError):
                continue
        if have < want:
            who = "this root" if rid == me else f"root {rid[:8]}"
            return (f"{who} needs {want} verified cop{'y' if want == 1 else 'ies'} elsewhere and "
                    f"{have} {'is' if have == 1 else 'are'} left; kept")
    return ""


# -- copy, move, drop ----------------------------------------------------------------------------

def copy(root: Root, rels: Iterable[str], pm, to: str, session: Session | None = None) -> Result:
    """Put the content of the named stubs on remote ``to`` too: fetched from the nearest remote
    that holds it into a nameless local file, verified, stored on ``to`` and verified there."""
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        _copy(root, cat, dirs, rels, pm, _remote(root, to), session, result)
    return result


def _copy(root: Root, cat: Catalog, dirs: DirFds, rels, pm, dest: Remote, session: Session,
          result: Result) -> list:
    """Copy, under the lock; returns the entries that ``dest`` now holds."""
    return _copy_entries(root, cat, _stubs(root, dirs, rels, result), pm, dest, session, result)


def _copy_entries(root: Root, cat: Catalog, entries: list, pm, dest: Remote, session: Session,
                  result: Result) -> list:
    if not entries:
        return []
    recorder = Recorder(root, pm, session)
    _identity(root, dest, pm, session)
    sources = sorted((r for r in root.remotes() if r.name != dest.name), key=lambda r: (r.tier, r.name))
    known = cat.remotes_of(e.record.oid for e in entries)
    todo, there = [], []
    for e in entries:
        rec = e.record
        if pm.hook.has(remote=dest, oid=rec.oid, size=rec.size, session=session) is True:
            cat.record_location(rec.oid, dest.name, rec.size)
            there.append(e)
            result.unchanged += 1
        else:
            todo.append(e)
    if todo:
        recorder.before_store(dest, {e.record.oid for e in todo})
    done_oids: dict[str, int] = {}
    for e in todo:
        rec = e.record
        if rec.oid in done_oids:
            there.append(e)
            result.done.append((e.rel, rec.size))
            continue
        order = sorted(sources, key=lambda r: (r.name not in known[rec.oid], r.tier, r.name))
        problems = []
        for src in order:
            try:
                _identity(root, src, pm, session)
                _transfer(root, src, dest, rec.oid, rec.size, pm, session)
            except (JamError, OSError) as exc:
                problems.append(describe(exc))
                continue
            done_oids[rec.oid] = rec.size
            break
        else:
            result.failed.append((e.rel, "; ".join(problems) or "no remote holds its content"))
            continue
        there.append(e)
        result.done.append((e.rel, rec.size))
    if done_oids:
        pm.hook.sync(remote=dest, session=session)
        with cat.transaction():
            for oid, size in done_oids.items():
                cat.record_location(oid, dest.name, size)
    for problem in recorder.publish(referenced(root, cat), [dest]):
        result.skipped.append((".", problem))
    return there


class _Absent(JamError):
    pass


def _transfer(root: Root, src: Remote, dest: Remote, oid: str, size: int, pm, session: Session) -> None:
    """Fetch ``oid`` from ``src`` into a nameless file in ROOT/.jam/tmp, verify it, store it on
    ``dest`` (which verifies again). Raises on any failure; nothing is left behind."""
    tmpdir = root.jam_dir / "tmp"
    fd = os.open(tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        ok = pm.hook.fetch(remote=src, oid=oid, dest=Path(fd_path(fd)), size=size, session=session)
        if ok is None:
            raise RemoteError(f"remote {src.name!r}: no installed plugin handles kind {src.kind!r}")
        if ok is not True:
            raise _Absent(f"remote {src.name!r} does not have {oid}")
        os.lseek(fd, 0, os.SEEK_SET)
        if hash_fd(fd, split_oid(oid)[0], threads=True) != (oid, size):
            raise JamError(f"remote {src.name!r} returned corrupt content for {oid}")
        stored = pm.hook.stash(remote=dest, oid=oid, source=Path(fd_path(fd)), size=size, session=session)
        if stored is not True:
            raise RemoteError(f"remote {dest.name!r} did not store {oid}")
    finally:
        os.close(fd)


def copy_objects(root: Root, pm, session: Session, dest: Remote, wanted: dict[str, int], holders=None,
                 recorder: Recorder | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """Copy each object of ``wanted`` (oid -> size) onto ``dest`` from another remote of the
    root: the remotes ``holders(oid)`` names first, then the others by tier; each through
    :func:`_transfer` (fetched, verified, stored, verified by the backend). This root's refs
    on ``dest`` are recorded before (``recorder``: published by the caller), ``dest`` is made
    durable after, and a copy another root is removing from ``dest`` at this moment does not
    count. The caller holds the root's lock. Returns (copied, failed with why)."""
    copied: dict[str, int] = {}
    failed: dict[str, str] = {}
    if not wanted:
        return copied, failed
    recorder = recorder or Recorder(root, pm, session)
    _identity(root, dest, pm, session)
    recorder.before_store(dest, set(wanted))
    sources = [r for r in root.remotes() if r.name != dest.name]
    down: dict[str, str] = {}
    for oid, size in wanted.items():
        near = holders(oid) if holders else set()
        whys = []
        for src in sorted(sources, key=lambda r: (r.name not in near, r.tier, r.name)):
            if src.name in down:
                whys.append(down[src.name])
                continue
            try:
                _identity(root, src, pm, session)
            except (JamError, OSError) as exc:
                down[src.name] = f"remote {src.name!r}: {describe(exc)}"
                whys.append(down[src.name])
                continue
            try:
                _transfer(root, src, dest, oid, size, pm, session)
            except (JamError, OSError) as exc:
                whys.append(describe(exc))
                continue
            copied[oid] = size
            break
        else:
            failed[oid] = "; ".join(whys) or "no other remote holds it"
    if copied:
        pm.hook.sync(remote=dest, session=session)
        going = recorder.removing_elsewhere(dest)
        for oid in [o for o in copied if o in going]:
            del copied[oid]
            failed[oid] = f"another root is removing it from {dest.name!r} at this moment"
    return copied, failed


def drop(root: Root, rels: Iterable[str], pm, src: str, session: Session | None = None) -> Result:
    """Remove the named stubs' content from remote ``src``, each only if enough verified copies
    remain elsewhere for every root that refers to it (:func:`remove_copies`)."""
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        remote = _remote(root, src)
        entries = _stubs(root, dirs, rels, result)
        _drop(root, cat, pm, session, remote, entries, result)
    return result


def _drop(root: Root, cat: Catalog, pm, session: Session, remote: Remote, entries, result: Result) -> None:
    if not entries:
        return
    wanted = {e.record.oid: e.record.size for e in entries}
    own = referenced(root, cat) | set(wanted)
    removed, refused = remove_copies(root, cat, pm, session, remote, wanted, own)
    for e in entries:
        oid = e.record.oid
        if oid in removed:
            result.done.append((e.rel, e.record.size))
        elif oid in refused:
            result.skipped.append((e.rel, f"not removed from {remote.name!r}: {refused[oid]}"))
            result.partly = True
        else:
            result.unchanged += 1


def move(root: Root, rels: Iterable[str], pm, src: str, dst: str, session: Session | None = None) -> Result:
    """Copy to ``dst``, then drop from ``src`` what ``dst`` now holds."""
    if src == dst:
        raise UsageError("--from and --to name the same remote")
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        source = _remote(root, src)
        dest = _remote(root, dst)
        there = _copy(root, cat, dirs, rels, pm, dest, session, result)
        copied = Result()
        _drop(root, cat, pm, session, source, there, copied)
        result.skipped += copied.skipped
        result.partly = result.partly or copied.partly
    return result


def _move_versions(root: Root, cat: Catalog, pm, session: Session, src: str, dest: Remote, keep: set[str],
                   copies: int, result: Result) -> None:
    """The objects the kept snapshots need, and the snapshots themselves, that are known on
    ``src`` and would be left with fewer than ``copies`` known copies without it (the
    history index's ``stored`` and ``pushed``, the catalog's locations): copied to ``dest``
    through :func:`copy_objects` (from ``src`` first), recorded there in the index. What
    cannot be copied is a failure (the caller then removes nothing)."""
    from jam_core.history.index import Index, exists

    if not exists(root):
        return
    with Index(root) as ix:
        kept = ix.kept_objects()
        sids = set(ix.snapshot_ids())
        candidates = (ix.stored_by(src) & kept) | (ix.pushed_to(src) & sids)
        if not candidates:
            return
        known = cat.remotes_of(candidates - sids)
        short: set[str] = set()
        for oid in candidates:
            holders = ix.pushed_on(oid) if oid in sids else ix.stored_on(oid) | known.get(oid, set())
            if len(holders & keep) < copies:
                short.add(oid)
        if not short:
            return
        wanted: dict[str, int] = {}
        label: dict[str, str] = {}
        for sid in sorted(sids):
            data = ix.read_bytes(sid)
            if sid in short:
                wanted[sid], label[sid] = len(data or b""), f"snapshot {sid[:19]}"
            if not (short - sids - set(wanted)):
                continue
            for item in ix.load(sid).items:
                if item.oid in short and item.oid not in wanted and item.size:
                    wanted[item.oid], label[item.oid] = item.size, f"{item.path} (snapshot {sid[:19]})"
        for oid in short - set(wanted):
            result.failed.append((oid, "needed by a kept snapshot, size unknown here: not copied"))
        recorder = Recorder(root, pm, session)
        try:
            copied, failed = copy_objects(root, pm, session, dest, wanted, holders=lambda _oid: {src},
                                          recorder=recorder)
        finally:
            if recorder.pending:
                for problem in recorder.publish(referenced(root, cat), [dest]):
                    result.failed.append((".", problem))
        ix.record_stored((o, dest.name) for o in copied if o not in sids)
        for sid in (o for o in copied if o in sids):
            ix.record_pushed(sid, dest.name)
        for oid, size in copied.items():
            result.done.append((label[oid], size))
        for oid, why in failed.items():
            result.failed.append((label[oid], why))


def move_off(root: Root, pm, src: str, dst: str, session: Session | None = None) -> Result:
    """Before remote ``src`` is forgotten (``jam remote remove SRC --move-to DST``): every object
    of this root's stubs that ``src`` holds and that would be left with fewer than ``[place]
    copies`` known copies without it is copied to ``dst`` and verified there (hashed in place
    where the backend can); then this root's objects are dropped from ``src`` through the one
    guarded removal (kept where another root still needs them there). Any object that could
    not be copied and verified is a failure: the caller then removes nothing. The objects
    the kept snapshots need whose only known copies are on ``src`` (and the snapshots) are
    copied the same way (:func:`_move_versions`)."""
    if src == dst:
        raise UsageError("--move-to names the remote being removed")
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        source, dest = _remote(root, src), _remote(root, dst)
        if dest not in durable([dest]):
            raise UsageError(f"remote {dst!r} is an edge cache: its copies do not count; move to another remote")
        entries = _stubs(root, dirs, ["."], result)
        known = cat.remotes_of(e.record.oid for e in entries)
        keep = {r.name for r in durable(root.remotes())} - {src}
        copies = copies_of(root.config)
        on_src, short = [], []
        for e in entries:
            holders = known[e.record.oid] | set(e.record.remotes)
            if src not in holders:
                continue
            on_src.append(e)
            if len(holders & keep) < copies:  # without src it would have too few copies
                short.append(e)
        there = _copy_entries(root, cat, short, pm, dest, session, result)
        _move_versions(root, cat, pm, session, src, dest, keep, copies, result)
        for e in there:
            try:
                ok = _verified(dest, e.record.oid, e.record.size, pm, session)
            except (JamError, OSError) as exc:
                ok, why = False, describe(exc)
            else:
                why = f"not verified on {dst!r} after the copy"
            if not ok:
                result.failed.append((e.rel, why))
        if result.failed or result.aborted:
            return result
        dropped = Result()
        _drop(root, cat, pm, session, source, on_src, dropped)
        result.skipped += dropped.skipped  # kept on src for another root: said, not a failure
    return result

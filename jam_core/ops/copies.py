"""Where each file's content is, and copies between remotes: ``where``, ``copy``, ``move``,
``drop``; and the one guarded removal every path that removes a copy goes through
(:func:`remove_copies`: drop, move, gc, edge expiry, remote remove).

Invariant 12: under the root's lock, before removing object X from remote R, this root writes
on R that it is about to remove X (``refs.Recorder.intent``), then reads live what every root
that uses R refers to, and asks the other remotes live whether they hold X (hashing it in place
where the backend can, else ``has``). X goes only if no root refers to it on R, or every root
that does still has enough copies elsewhere (its ``[place] copies``), counting only remotes that
root uses and copies no other root is about to remove. No flag bypasses it.

An object a remote holds only as content-defined chunks (``history.chunks``: a large file
committed, never stashed whole) is copied and moved as its pieces when the caller hands a
``pieces`` carrier (``history.chunks.Pieces``; that module sits above this one in the layers):
the recipe and every chunk the destination lacks, each verified by its id, then its pointer
last. A move removes its pieces from the source only once the destination holds them all
(verified), each piece through the same guard, never a piece another needed object's recipe
lists there, and empties the source's pointer after its pieces.
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
from jam_core.ops.refs import Recorder, Users, live_oids, referenced, users
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


def where(root: Root, rels: Iterable[str], pm, check: bool = False, session: Session | None = None,
          pieces=None) -> tuple[list[Where], Result]:
    """Which remotes hold each named stub's object (``check``: asked live; with ``pieces``, a
    copy held as chunks counts)."""
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
                        w.live[r.name] = "yes" if _verified(r, rec.oid, rec.size, pm, session, pieces) else "no"
                    except (JamError, OSError) as exc:
                        down[r.name] = w.live[r.name] = f"unreachable: {describe(exc)}"
                w.known = [n for n, v in w.live.items() if v == "yes"]
            out.append(w)
    return out, result


def _identity(root: Root, remote: Remote, pm, session: Session) -> None:
    from jam_core.ops.remotes import ensure_identity

    ensure_identity(root, remote, pm, session)


def _verified(remote: Remote, oid: str, size: int, pm, session: Session, pieces=None) -> bool:
    """Does ``remote`` hold an intact copy of ``oid``, asked live? Hashed in place where the
    backend can (``hash_object``), else its size (``has``); with ``pieces``, a copy held as
    chunks counts too (``pieces.verified``). Once per command and copy."""
    key = ("jam.copies.verified", remote.name, oid, pieces is not None)
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
    if not ok and pieces is not None:
        ok = pieces.verified(remote, oid, size)
    session.cache[key] = ok
    return ok


# -- the guarded removal -------------------------------------------------------------------------

def remove_remote(root: Root, name: str, force: bool = False, pm=None, session: Session | None = None,
                  pieces=None) -> None:
    """Forget remote ``name`` (its objects stay on it). Unless ``force``: refused while it may
    hold the only copy of an object this root's stubs stand for (:func:`_only_on`: the stubs
    walked, each object asked live of the other durable remotes; never the catalog's location
    rows alone, which a lost catalog, a reused name or a copy lost elsewhere make wrong) or of
    a kept version. Then the catalog's location rows of that name are forgotten: a remote
    added later under it vouches for none of the old one's copies. ``pieces``
    (``history.chunks.Pieces``, of ``pm`` and ``session``): copies held as
    chunks on the other remotes count too.

    In this module, not ``ops.remotes``: another remote's copy counts only if it verifies
    (:func:`_verified`, the check ``drop`` makes)."""
    with root.lock():
        from jam_core.ops.remotes import _own_remotes, _remote_tables, _user_config

        if name not in _remote_tables(root.config):
            raise UsageError(f"no remote named {name!r}")
        if name not in _remote_tables(root.own_config()):
            raise UsageError(f"remote {name!r} is set in your user config ({_user_config()}), not in this "
                             "root's; remove it there")
        if not force:
            if pm is None:
                from jam_core.manager import make_plugin_manager

                pm = make_plugin_manager()
            if session is None:
                with Session() as own:
                    only = _only_on(root, name, pm, own, pieces)
            else:
                only = _only_on(root, name, pm, session, pieces)
            versions = 0
            from jam_core.history.index import Index, exists

            if exists(root):
                with Index(root, create=False) as ix:
                    versions = ix.only_on(name)  # objects kept versions need, known to be only there
            if only or versions:
                what = " and ".join(w for w in (only and f"{only} stubbed file(s)",
                                                 versions and f"{versions} object(s) of kept versions") if w)
                raise UsageError(
                    f"remote {name!r} holds the only copy of {what}; move them first with "
                    f"`jam remote remove {name} --move-to OTHER` (or check them out, or --force to forget it anyway)"
                )
        root.update_config(lambda own: _own_remotes(root, own).pop(name, None))
        with Catalog(root.jam_dir / CATALOG) as cat:
            cat.forget_remote(name)


def _only_on(root: Root, name: str, pm, session: Session, pieces=None) -> int:
    """How many objects of this root's stubs (the catalog's and a fresh walk's: a lost catalog
    forgets none) no other durable remote holds intact, asked live (``copies._verified``, as
    ``drop`` asks: hashed in place where the backend can, so a corrupt copy of the right size
    counts for nothing; a chunked object by its recipe and every chunk), while ``name`` may (it
    says so by ``has``, or cannot be asked). The catalog's location rows only order the
    asking. An unreachable remote holds nothing."""
    from jam_core.history.index import Index, exists
    from jam_core.scan import walk

    def on_error(rel, exc):
        raise UsageError(f"{rel}: {getattr(exc, 'strerror', None) or exc}; jam cannot tell which objects only "
                         f"remote {name!r} holds (--force forgets it anyway)")

    needed: dict[str, int] = {}
    with Catalog(root.jam_dir / CATALOG) as cat:
        for oid, size in cat.stubs().values():
            needed[oid] = size
        for e in walk(str(root.path), ".", on_error):
            if e.state in (STUB, DIRTY) and e.record is not None:
                needed[e.record.oid] = e.record.size
        if not needed:
            return 0
        known = cat.remotes_of(needed)
    remotes = root.remotes()
    target = next((r for r in remotes if r.name == name), None)
    me = target.options.get("id") if target is not None else None

    def reachable(r: Remote) -> bool:
        try:
            _identity(root, r, pm, session)
            return True
        except (JamError, OSError):
            return False

    others = [r for r in durable(remotes)
              if r.name != name and not (me and r.options.get("id") == me) and reachable(r)]
    ask_target = target is not None and reachable(target)
    ix = Index(root, create=False) if exists(root) else None
    try:
        def intact(r: Remote, oid: str, size: int) -> bool:
            try:
                return _verified(r, oid, size, pm, session, pieces)
            except (JamError, OSError):
                return False

        def may_hold(r: Remote, oid: str, size: int) -> bool:
            try:
                if pm.hook.has(remote=r, oid=oid, size=size, session=session) is True:
                    return True
                recipe = ix.recipe_of(oid) if ix is not None else None
                if recipe is None:
                    return False
                rid, stored, chunks = recipe
                return pm.hook.has(remote=r, oid=rid, size=stored, session=session) is True and all(
                    pm.hook.has(remote=r, oid=c, size=n, session=session) is True for c, n in chunks.items())
            except (JamError, OSError):
                return True  # cannot be asked: it may hold the only copy

        only = 0
        for oid, size in needed.items():
            first = known.get(oid, set())
            if any(intact(r, oid, size) for r in sorted(others, key=lambda r: r.name not in first)):
                continue
            if ask_target and not may_hold(target, oid, size) and (
                    ix is None or ix.recipe_of(oid) is None):
                continue  # lost everywhere, ``name`` included: forgetting it loses nothing
            only += 1
        return only
    finally:
        if ix is not None:
            ix.close()



def remove_copies(root: Root, cat: Catalog, pm, session: Session, remote: Remote, wanted: dict[str, int],
                  own: set[str], recorder: Recorder | None = None, pieces=None
                  ) -> tuple[dict[str, int], dict[str, str]]:
    """Remove from ``remote`` the objects of ``wanted`` (oid -> size) that may go; ``own`` is
    what this root refers to. The caller holds the root's lock. Returns (removed, refused with
    why). Never removes on "unknown": an unreachable remote counts no copy. ``pieces``
    (``history.chunks.Pieces``): an object ``remote`` holds as chunks goes as its pieces
    (:func:`_remove_pieces`), and copies held as chunks elsewhere count."""
    removed: dict[str, int] = {}
    refused: dict[str, str] = {}
    gone: set[str] = set()  # pieces (chunks, recipes) removed
    if not wanted:
        return removed, refused
    recorder = recorder or Recorder(root, pm, session)
    _identity(root, remote, pm, session)
    parts: dict[str, dict[str, int] | None] = {}  # chunked on ``remote``: its pieces (None: unreadable)
    if pieces is not None:
        pointed = pieces.pointed(remote)
        for oid, size in wanted.items():
            if oid in pointed:
                try:
                    got = pieces.of(remote, oid, size)
                except RemoteError:
                    raise
                except JamError:
                    got = (None, None)  # a dangling pointer (a killed move) or a bad recipe: emptied only
                if got is not None:
                    parts[oid] = got[1]
    recorder.intent(remote, set(wanted).union(*(p for p in parts.values() if p)))
    try:
        here = users(remote, pm, session)
        others: list[tuple[Remote, Users]] = []
        me = remote.options.get("id")
        for r in durable(root.remotes()):
            if r.name == remote.name or (me is not None and r.options.get("id") == me):
                continue  # the same store under another name: no other copy
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
            why = _short_of(oid, size, needing, others, recorder.rid, pm, session, pieces)
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
            if oid in parts:
                continue  # its pieces next, once every whole object is decided
            removed[oid] = size
            cat.forget_location(oid, remote.name)
        chunked = {o: parts[o] for o in parts if o not in refused}
        if chunked and len(refused) + len(removed) + len(chunked) == len(wanted):
            _remove_pieces(root, cat, pm, session, remote, chunked, wanted, own, here, others, recorder.rid,
                           recorder.copies, pieces, removed, refused, gone)
        else:
            for o in chunked:
                refused.setdefault(o, f"remote {remote.name!r}: not every object could be decided; kept")
    finally:
        try:
            recorder.intent(remote, ())
        except (JamError, OSError):
            pass  # a stale intent only makes other roots count fewer copies: safe
        _forget_stored(root, remote, gone.union(removed))
    return removed, refused


def _forget_stored(root: Root, remote: Remote, oids: set[str]) -> None:
    """The history index no longer counts ``oids`` as stored on ``remote``: a commit would
    otherwise take content moved or collected away for stored and upload nothing."""
    import sqlite3

    from jam_core.history.index import HistoryError, Index, exists

    if not oids or not exists(root):
        return
    try:
        with Index(root, create=False) as ix:
            ix.forget_stored((o, remote.name) for o in oids)
    except sqlite3.Error as exc:
        raise HistoryError(f"removed from {remote.name!r}, but the history index could not record it: {exc}; "
                           "run `jam commit` with care (it may take that content for stored)") from None


def _remove_pieces(root: Root, cat: Catalog, pm, session: Session, remote: Remote,
                   chunked: dict[str, dict[str, int] | None],
                   wanted: dict[str, int], own: set[str], here: Users, others, me: str, copies: int, pieces,
                   removed: dict[str, int], refused: dict[str, str], gone: set[str]) -> None:
    """The pieces of the objects of ``chunked`` (each already allowed to leave ``remote``: enough
    verified copies elsewhere), chunks first, then recipes, then each pointer emptied. A piece
    another object needed here is made of (whoever needs it: every root's refs and this root's,
    read through the remote's own pointers) stays; a piece some root names itself goes only
    through the same guard as any object. This root's stubs are walked afresh (as gc does): a
    stub the catalog does not know yet still needs its pieces."""
    needed = set(own).union(live_oids(root, cat), *(oids for _c, oids in here.refs.values()))
    keep, problems = pieces.shared(remote, needed - set(chunked))
    if problems:
        for oid in chunked:
            refused[oid] = problems[0]
        return
    order: dict[str, int] = {}
    for got in chunked.values():
        for p, n in (got or {}).items():
            if p not in keep:
                order[p] = n
    recipes = {next(reversed(got)) for got in chunked.values() if got}  # ``of`` lists the recipe last
    for p in sorted(order, key=lambda p: p in recipes):
        needing = dict(here.needing(p))
        needing.pop(me, None)
        if p in own:
            needing[me] = copies
        if _short_of(p, order[p], needing, others, me, pm, session):
            continue  # a root names this piece itself and would lack it: it stays
        _about_to_remove(remote, p)
        try:
            pm.hook.remove(remote=remote, oid=p, session=session)
        except (JamError, OSError) as exc:
            for oid in chunked:
                refused.setdefault(oid, describe(exc))
            if isinstance(exc, RemoteError):
                return
            continue
        gone.add(p)
    for oid, got in chunked.items():
        if oid in refused:
            continue
        if got is None or gone & set(got):
            pieces.forget(remote, oid)  # after its pieces: a reader finds no pointer, not a broken one
        removed[oid] = wanted[oid]
        cat.forget_location(oid, remote.name)


def _short_of(oid: str, size: int, needing: dict[str, int], others, me: str, pm, session: Session,
              pieces=None) -> str:
    """Why ``oid`` may not leave (a root would have too few copies left), or "" if it may."""
    for rid, want in needing.items():
        want = max(want, 1)
        have = 0
        counted: set[str] = set()  # each store once, under whatever names it is configured
        for r, u in others:
            store = r.options.get("id") or r.name
            if store in counted:
                continue
            if rid != me and oid not in u.refs.get(rid, (0, set()))[1]:
                continue  # that root's refs there do not name it (it does not use this remote): no copy for it
            if u.being_removed(oid, but=me):
                continue  # another root is removing that copy right now
            try:
                if _verified(r, oid, size, pm, session, pieces):
                    have += 1
                    counted.add(store)
            except (JamError, OSError):
                continue
        if have < want:
            who = "this root" if rid == me else f"root {rid[:8]}"
            return (f"{who} needs {want} verified cop{'y' if want == 1 else 'ies'} elsewhere and "
                    f"{have} {'is' if have == 1 else 'are'} left; kept")
    return ""


# -- copy, move, drop ----------------------------------------------------------------------------

def copy(root: Root, rels: Iterable[str], pm, to: str, session: Session | None = None, pieces=None) -> Result:
    """Put the content of the named stubs on remote ``to`` too: fetched from the nearest remote
    that holds it into a nameless local file, verified, stored on ``to`` and verified there.
    ``pieces`` (``history.chunks.Pieces``): an object a remote holds only as chunks is
    carried as its pieces."""
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        _copy(root, cat, dirs, rels, pm, _remote(root, to), session, result, pieces)
    return result


def _copy(root: Root, cat: Catalog, dirs: DirFds, rels, pm, dest: Remote, session: Session,
          result: Result, pieces=None) -> list:
    """Copy, under the lock; returns the entries that ``dest`` now holds."""
    return _copy_entries(root, cat, _stubs(root, dirs, rels, result), pm, dest, session, result, pieces)


def _copy_entries(root: Root, cat: Catalog, entries: list, pm, dest: Remote, session: Session,
                  result: Result, pieces=None) -> list:
    if not entries:
        return []
    recorder = Recorder(root, pm, session)
    _identity(root, dest, pm, session)
    sources = sorted((r for r in root.remotes() if r.name != dest.name), key=lambda r: (r.tier, r.name))
    known = cat.remotes_of(e.record.oid for e in entries)
    todo, there = [], []
    for e in entries:
        rec = e.record
        if _verified(dest, rec.oid, rec.size, pm, session, pieces):  # a copy there of the right size may be corrupt
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
                _whole_or_pieces(root, src, dest, rec.oid, rec.size, pm, session, pieces, recorder)
            except (JamError, OSError) as exc:
                problems.append(describe(exc))
                continue
            done_oids[rec.oid] = rec.size
            session.cache.pop(("jam.copies.verified", dest.name, rec.oid, pieces is not None), None)  # asked again
            break
        else:
            if pieces is not None and _held_as_pieces(pieces, dest, rec.oid, rec.size):
                there.append(e)  # a killed move's rerun: the destination holds it as chunks already
                result.unchanged += 1
                continue
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


def _whole_or_pieces(root: Root, src: Remote, dest: Remote, oid: str, size: int, pm, session: Session, pieces,
                     recorder: Recorder) -> None:
    """:func:`_transfer` the whole object; if ``src`` has it only as chunks, carry its pieces."""
    try:
        _transfer(root, src, dest, oid, size, pm, session)
    except _Absent:
        if pieces is None or not pieces.carry(src, dest, oid, size, recorder):
            raise


def _held_as_pieces(pieces, remote: Remote, oid: str, size: int) -> bool:
    try:
        return pieces.held(remote, oid, size)
    except (JamError, OSError):
        return False


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
        if hash_fd(fd, split_oid(oid)[0]) != (oid, size):
            raise JamError(f"remote {src.name!r} returned corrupt content for {oid}")
        stored = pm.hook.stash(remote=dest, oid=oid, source=Path(fd_path(fd)), size=size, session=session)
        if stored is not True:
            raise RemoteError(f"remote {dest.name!r} did not store {oid}")
    finally:
        os.close(fd)


def copy_objects(root: Root, pm, session: Session, dest: Remote, wanted: dict[str, int], holders=None,
                 recorder: Recorder | None = None, pieces=None) -> tuple[dict[str, int], dict[str, str]]:
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
                _whole_or_pieces(root, src, dest, oid, size, pm, session, pieces, recorder)
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


def drop(root: Root, rels: Iterable[str], pm, src: str, session: Session | None = None, pieces=None) -> Result:
    """Remove the named stubs' content from remote ``src``, each only if enough verified copies
    remain elsewhere for every root that refers to it (:func:`remove_copies`; ``pieces``: an
    object held there as chunks goes as its pieces, copies held as chunks elsewhere count)."""
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        remote = _remote(root, src)
        entries = _stubs(root, dirs, rels, result)
        _drop(root, cat, pm, session, remote, entries, result, pieces)
    return result


def promised_on(root: Root, remote: Remote) -> set[str]:
    """The objects of the snapshot this root's head on ``remote`` names (``jam commit`` wrote it
    there once the remote held every object of it: a clone from that remote alone finds every
    byte of the last commit)."""
    from jam_core.history.index import Index, exists
    from jam_core.history.snapshot import FILE

    if not exists(root):
        return set()
    with Index(root, create=False) as ix:
        row = ix.db.execute("SELECT value FROM meta WHERE key = ?", (f"head:{remote.name}",)).fetchone()
        if row is None:
            return set()
        snap = ix.load(row[0])
    return {i.oid for i in snap.items if i.kind == FILE and i.size}


def _drop(root: Root, cat: Catalog, pm, session: Session, remote: Remote, entries, result: Result,
          pieces=None, keep_promised: bool = True) -> None:
    """Remove ``entries``' objects from ``remote`` through the guarded removal. Unless
    ``keep_promised`` (a remote being forgotten): what the head of this tree on ``remote``
    needs stays there, said (a clone from it must find every byte of the last commit)."""
    if not entries:
        return
    if keep_promised:
        promised = promised_on(root, remote)
        for e in entries:
            if e.record.oid in promised:
                result.skipped.append((e.rel, f"not removed from {remote.name!r}: the last commit's head there needs "
                                              f"it (a clone from {remote.name!r} finds every byte of it)"))
                result.partly = True
        entries = [e for e in entries if e.record.oid not in promised]
        if not entries:
            return
    wanted = {e.record.oid: e.record.size for e in entries}
    own = referenced(root, cat) | set(wanted)
    removed, refused = remove_copies(root, cat, pm, session, remote, wanted, own, pieces=pieces)
    for e in entries:
        oid = e.record.oid
        if oid in removed:
            result.done.append((e.rel, e.record.size))
        elif oid in refused:
            result.skipped.append((e.rel, f"not removed from {remote.name!r}: {refused[oid]}"))
            result.partly = True
        else:
            result.unchanged += 1


def move(root: Root, rels: Iterable[str], pm, src: str, dst: str, session: Session | None = None,
         pieces=None) -> Result:
    """Copy to ``dst``, then drop from ``src`` what ``dst`` now holds (``pieces``: as for
    :func:`copy`; an object held as chunks leaves ``src`` as its pieces)."""
    if src == dst:
        raise UsageError("--from and --to name the same remote")
    result = Result()
    session = session or Session()
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        source = _remote(root, src)
        dest = _remote(root, dst)
        there = _copy(root, cat, dirs, rels, pm, dest, session, result, pieces)
        copied = Result()
        _drop(root, cat, pm, session, source, there, copied, pieces, keep_promised=False)  # moved: the next
        # commit completes ``src`` again for its head (the history index forgets it stored there)
        result.skipped += copied.skipped
        result.partly = result.partly or copied.partly
    return result


def _move_versions(root: Root, cat: Catalog, pm, session: Session, src: str, dest: Remote, keep: set[str],
                   copies: int, result: Result, pieces=None) -> None:
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
        made_of: dict[str, int] = {}  # the recipes and chunks of the large files among them, first
        for oid in list(wanted):
            rec = ix.recipe_of(oid)
            if rec is not None:
                for p, n in {**rec[2], rec[0]: rec[1]}.items():
                    if p in short and p not in wanted and p not in made_of:
                        made_of[p] = n
                        label[p] = f"{label[oid]}: a piece"
        wanted = {**made_of, **wanted}
        for oid in short - set(wanted):
            result.failed.append((oid, "needed by a kept snapshot, size unknown here: not copied"))
        recorder = Recorder(root, pm, session)
        try:
            copied, failed = copy_objects(root, pm, session, dest, wanted, holders=lambda _oid: {src},
                                          recorder=recorder, pieces=pieces)
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


def move_off(root: Root, pm, src: str, dst: str, session: Session | None = None, pieces=None) -> Result:
    """Before remote ``src`` is forgotten (``jam remote remove SRC --move-to DST``): every object
    of this root's stubs that ``src`` holds and that would be left with fewer than ``[place]
    copies`` known copies without it is copied to ``dst`` and verified there (hashed in place
    where the backend can); then this root's objects are dropped from ``src`` through the one
    guarded removal (kept where another root still needs them there). Any object that could
    not be copied and verified is a failure: the caller then removes nothing. The objects
    the kept snapshots need whose only known copies are on ``src`` (and the snapshots) are
    copied the same way (:func:`_move_versions`). ``pieces``: as for :func:`copy`."""
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
        me = source.options.get("id")
        stay = [r for r in durable(root.remotes()) if r.name != src and not (me and r.options.get("id") == me)]
        keep = {r.name for r in stay}
        copies = copies_of(root.config)

        def copies_left(oid: str, size: int) -> int:
            """Intact copies without src, asked live (the catalog's rows may be wrong: a copy
            lost, a name reused); each store once, an unreachable one counts none."""
            counted: set[str] = set()
            for r in stay:
                try:
                    _identity(root, r, pm, session)
                    if _verified(r, oid, size, pm, session, pieces):
                        counted.add(r.options.get("id") or r.name)
                except (JamError, OSError):
                    continue
                if len(counted) >= copies:
                    break
            return len(counted)

        on_src, short = [], []
        for e in entries:
            holders = known[e.record.oid] | set(e.record.remotes)
            if holders and src not in holders:
                continue  # a catalog that knows no holder (lost, its rows gone) names none: asked below
            on_src.append(e)
            if copies_left(e.record.oid, e.record.size) < copies:  # without src it would have too few copies
                short.append(e)
        there = _copy_entries(root, cat, short, pm, dest, session, result, pieces)
        _move_versions(root, cat, pm, session, src, dest, keep, copies, result, pieces)
        for e in there:
            try:
                ok = _verified(dest, e.record.oid, e.record.size, pm, session, pieces)
            except (JamError, OSError) as exc:
                ok, why = False, describe(exc)
            else:
                why = f"not verified on {dst!r} after the copy"
            if not ok:
                result.failed.append((e.rel, why))
        if result.failed or result.aborted:
            return result
        dropped = Result()
        _drop(root, cat, pm, session, source, on_src, dropped, pieces, keep_promised=False)  # forgotten next
        result.skipped += dropped.skipped  # kept on src for another root: said, not a failure
    return result

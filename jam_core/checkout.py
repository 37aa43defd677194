"""Checkout: bring stubs back. Content is written aside, verified against its id, and renamed
over the stub only if the stub is still that stub. A failed or interrupted fetch leaves the
stub as it was; a stub that was written into is never fetched over."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from jam_core.catalog import Catalog
from jam_core.errors import JamError, RemoteError
from jam_core.model import Remote, Session
from jam_core.objects import split_oid, hash_file
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, Entry
from jam_core.fs import syncfs
from jam_core import pipeline
from jam_core.pipeline import batches
from jam_core.stash import Result, _why, collect, same_file, tmp_name, user_xattrs
from jam_core.stubdirs import refresh as refresh_stubdirs


def checkout(root: Root, rels: Iterable[str], pm, session: Session | None = None) -> Result:
    """Check out files and directories (relative to the root). Holds the root's lock.

    Files go in batches: each batch is fetched aside (``fetch_many`` where a backend offers
    it, else ``fetch`` per file; the next remote for what one remote could not give) and
    verified, made durable with one syncfs, then each file is renamed over its stub if the
    stub is unchanged. An interruption leaves stubs and no temporary files.
    """
    result = Result()
    session = session or Session()
    remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        todo = []
        for entry, _named in collect(root, rels, result):
            if entry.state == LOCAL:
                result.unchanged += 1
            elif entry.state == DIRTY:
                result.skipped.append((entry.rel, "this stub was written into after it was stashed; "
                                       "jam will not overwrite it (see `jam doctor`)"))
            elif entry.state == BAD:
                result.failed.append((entry.rel, f"unreadable stub metadata: {entry.problem}"))
            else:
                todo.append(entry)
        session.begin(2 * sum(e.record.size for e in todo))  # fetch, then verify
        try:
            # While a worker fetches and verifies batch N, swap batch N-1 in.
            pipeline.run(
                batches(todo, lambda e: e.record.size),
                prepare=lambda batch: _wants(batch, remotes, cat),
                move=lambda wants: _fetch_all(wants, pm, session, result),
                finish=lambda wants, fetching: _swap_batch(root, fetching.result(), cat, result),
                stop=lambda: bool(result.aborted),
                session=session,
                cleanup=_drop_tmps,
            )
        finally:
            refresh_stubdirs(root, cat)  # the index the cd hooks read
    return result


class _Want:
    """One stub being fetched: where its content goes, which remotes are left to try."""

    def __init__(self, entry: Entry, remotes: list[Remote]):
        self.entry = entry
        self.remotes = remotes
        self.tmp = ""
        self.problems: list[str] = []
        self.unreachable = 0

    def new_tmp(self) -> str:
        self.drop_tmp()
        self.tmp = tmp_name(os.path.dirname(self.entry.path))
        os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        return self.tmp

    def drop_tmp(self) -> None:
        if self.tmp and os.path.lexists(self.tmp):
            os.unlink(self.tmp)
        self.tmp = ""


def _drop_tmps(wants: list[_Want]) -> None:
    for w in wants:
        w.drop_tmp()


def _fetch_all(wants: list[_Want], pm, session: Session, result: Result) -> list[_Want]:
    """Fetch and verify every want, trying its remotes in order. Returns the verified ones."""
    ready, pending = [], list(wants)
    while pending:
        by_remote: dict[str, list[_Want]] = {}
        for w in pending:
            by_remote.setdefault(w.remotes[0].name, []).append(w)
        pending = []
        for group in by_remote.values():
            remote = group[0].remotes[0]
            for w, problem in fetch_from(remote, group, pm, session):
                if problem is None:
                    ready.append(w)
                    session.file_done(2 * w.entry.record.size)
                    continue
                w.problems.append(problem)
                w.remotes = w.remotes[1:]
                if w.remotes:
                    pending.append(w)
                    continue
                w.drop_tmp()
                session.file_done(2 * w.entry.record.size)
                if w.unreachable == len(w.problems):  # no remote answered at all: stop
                    result.aborted = "; ".join(w.problems)
                else:
                    result.failed.append((w.entry.rel, "; ".join(w.problems)))
        if result.aborted:
            break
    return ready


def fetch_from(remote: Remote, wants: list[_Want], pm, session: Session) -> Iterator[tuple[_Want, str | None]]:
    """Fetch ``wants`` from one remote into fresh temporary files and verify each.

    Yields each want with None (its ``tmp`` holds verified content, mode and mtime restored)
    or a one-line problem. A remote that fails as a whole yields every want as unreachable.
    """
    by_oid: dict[str, list[_Want]] = {}
    for w in wants:
        by_oid.setdefault(w.entry.record.oid, []).append(w)
    items = []
    for oid, group in by_oid.items():
        items.append((oid, Path(group[0].new_tmp()), group[0].entry.record.size))
    outcomes: dict[str, object] = {}
    try:
        many = pm.hook.fetch_many(remote=remote, items=items, session=session)
        if many is not None:
            outcomes.update(many)
        else:
            for oid, dest, size in items:
                try:
                    outcomes[oid] = pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=session)
                except RemoteError:
                    raise
                except (JamError, OSError) as exc:
                    outcomes[oid] = exc
    except RemoteError as exc:
        for w in wants:
            w.unreachable += 1
            yield w, str(exc)
        return
    for oid, group in by_oid.items():
        first = group[0]
        outcome = outcomes.get(oid, False)
        if outcome is None:
            for w in group:
                w.unreachable += 1
                yield w, f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}"
            continue
        problem = _problem(remote, first, outcome, session)
        for w in group:
            if problem is None:
                if w is not first:  # equal content wanted twice: copy the verified file
                    shutil.copyfile(first.tmp, w.new_tmp())
                _restore_metadata(w.tmp, w.entry)
            yield w, problem


def _problem(remote: Remote, w: _Want, outcome, session: Session) -> str | None:
    """None if ``w.tmp`` now holds exactly the content of its id, else what went wrong."""
    rec = w.entry.record
    if isinstance(outcome, Exception):
        return _why(outcome)
    if outcome is not True:
        return f"remote {remote.name!r} does not have {rec.oid}"
    algorithm, _ = split_oid(rec.oid)
    got, got_size = hash_file(w.tmp, algorithm, session.progress)
    if got != rec.oid or got_size != rec.size:
        return (f"remote {remote.name!r} returned corrupt content for {rec.oid} "
                f"(hash {got[:15]}…, {got_size} bytes); stub left as it was")
    return None


def _swap_batch(root: Root, ready: list[_Want], cat: Catalog, result: Result) -> None:
    if not ready:
        return
    syncfs(root.path)
    with cat.transaction(keep_on_error=True):  # one commit per batch, not per file
        _swap_all(ready, cat, result)


def _swap_all(ready: list[_Want], cat: Catalog, result: Result) -> None:
    for w in ready:
        try:
            swap_in(w.tmp, w.entry)
        except (JamError, OSError) as exc:
            result.failed.append((w.entry.rel, _why(exc)))
            continue
        w.tmp = ""
        cat.remove_stub(w.entry.rel)
        cat.record_use([w.entry.rel])
        result.done.append((w.entry.rel, w.entry.record.size))


def _wants(batch: list[Entry], remotes: list[Remote], cat: Catalog) -> list["_Want"]:
    known = cat.remotes_of(e.record.oid for e in batch)
    return [_Want(e, _order(remotes, known[e.record.oid])) for e in batch]


def _order(remotes: list[Remote], known: set[str]) -> list[Remote]:
    """Remotes known to hold the object first, each group nearest tier first."""
    return sorted(remotes, key=lambda r: (r.name not in known, r.tier, r.name))


def _restore_metadata(tmp: str, entry: Entry) -> None:
    rec, st = entry.record, entry.st
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for k, v in user_xattrs(entry.path).items():
            os.setxattr(fd, k, v)
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, rec.mode)
        os.utime(fd, ns=(st.st_atime_ns, rec.mtime_ns))
    finally:
        os.close(fd)


def swap_in(tmp: str, entry: Entry) -> None:
    """Rename the verified content over the stub, only if the stub is still that stub."""
    try:
        now = os.lstat(entry.path)
    except FileNotFoundError:
        raise JamError("the stub disappeared while its content was being fetched") from None
    if not same_file(now, entry.st):
        raise JamError("the stub changed while its content was being fetched; left as it is")
    os.rename(tmp, entry.path)

"""Content-defined chunks: a large file that changes a little moves only its changed parts.

A file of ``[history] chunk_above`` bytes or more (default 64 MiB) that no remote holds whole
is cut by FastCDC (``pyfastcdc``: min 64 KiB, average 128 KiB, max 512 KiB) while its whole id
is computed in the same read. Each chunk is an ordinary object (the id of its bytes, stored and
verified by the backend as any object). A RECIPE is an object too: zlib-compressed text

    jam-recipe 1
    <whole id> <size>
    <chunk id> <length>      (one line per chunk, in order)

and ``meta/recipes/<algorithm>-<hex of the whole id>`` on each remote that holds the chunks
points to it (``jam-recipe-pointer 1\\n<recipe id>\\n<stored size>\\n``, written with
``write_meta``: atomic). So any root that needs X and finds no whole X on a remote finds its
recipe there (``assemble``): the recipe is verified by its id and validated as it is parsed
(hostile lengths, counts, ids, a total that is not the size, another file's recipe: refused in
one line), every chunk is verified by its id and written at its offset, and the caller verifies
the whole id as for any fetch: a lying recipe can only fail.

The history index (``index.py``: tables ``recipes`` and ``chunks``) remembers each recipe, so the
kept union (``kept_objects``, published by ``ops.refs.referenced``) holds the recipe and chunks
of every kept whole object: gc, drop and move never remove them.

The average is chosen so that a 100-byte edit of a 1 GiB file uploads well under 1 MiB, the
recipe included: about 8,000 chunks make a recipe of ~300 KiB once compressed, and the edited
chunk (or two, when the edit moves a cut point) are ~128 KiB each.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from jam_core.errors import IntegrityError, JamError, RemoteError, UsageError, describe
from jam_core.fs import fd_path
from jam_core.history import snapshot
from jam_core.objects import DEFAULT_ALGORITHM, hasher, is_valid_oid, split_oid

MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 64 << 10, 128 << 10, 512 << 10
DEFAULT_ABOVE = 64 << 20
MAGIC = b"jam-recipe 1\n"
POINTER_MAGIC = b"jam-recipe-pointer 1\n"
POINTERS = "recipes"
MAX_RECIPE = 64 << 20  # stored bytes of a recipe
MAX_TEXT = 128 << 20  # its text once inflated
MAX_LENGTH = 64 << 20  # a chunk's length in a recipe (ours are at most 4 x the average)
MAX_COUNT = 1 << 20  # chunks in one recipe
SPREAD = 1 << 19  # a file cut into more chunks than this at AVG_CHUNK gets larger chunks (doubled until not)
FETCH_BATCH = 64  # chunks fetched or stored at once, in memory ...
BATCH_BYTES = 64 << 20  # ... and at most this many bytes of them (a hostile recipe may list huge chunks)
_LINE = re.compile(rb"\A(b3|sha256):([0-9a-f]{64}) ([1-9][0-9]{0,17})\Z")


class RecipeError(JamError):
    exit_code = 1


def threshold(config) -> int:
    """``[history] chunk_above`` (a size; default 64 MiB): files this large or larger are chunked."""
    from jam_core.units import parse_size

    table = config.get("history", {}) if isinstance(config, dict) else {}
    if not isinstance(table, dict):
        raise UsageError("'history' must be a table")
    value = table.get("chunk_above")
    if value is None:
        return DEFAULT_ABOVE
    n = parse_size(value, "history.chunk_above")
    if n < 1:
        raise UsageError("history.chunk_above must be at least 1 byte")
    return n


@dataclass
class Cut:
    oid: str  # the whole file's id
    size: int
    chunks: list[tuple[str, int, int]] = field(default_factory=list)  # (chunk id, offset, length)


class _Reader:
    """The file as a stream for the chunker, hashing the whole as it goes (one read)."""

    def __init__(self, fd: int, whole, progress=None):
        self.fd, self.whole, self.progress, self.size = fd, whole, progress, 0

    def readinto(self, b) -> int:
        n = os.readv(self.fd, [b])
        if n:
            self.whole.update(b[:n])
            self.size += n
            if self.progress is not None:
                self.progress(n)
        return n


def cut(fd: int, progress=None) -> Cut:
    """Read ``fd`` from its start once: the whole id, and its chunks with their ids."""
    from pyfastcdc import FastCDC

    os.lseek(fd, 0, os.SEEK_SET)
    avg = AVG_CHUNK
    while os.fstat(fd).st_size // avg > SPREAD:  # a recipe of at most ~SPREAD chunks (~40 MiB of text)
        avg *= 2
    whole = hasher(DEFAULT_ALGORITHM, threads=True)
    reader = _Reader(fd, whole, progress)
    out: list[tuple[str, int, int]] = []
    cdc = FastCDC(avg_size=avg, min_size=avg * MIN_CHUNK // AVG_CHUNK, max_size=avg * MAX_CHUNK // AVG_CHUNK)
    for c in cdc.cut_stream(reader):
        h = hasher(DEFAULT_ALGORITHM)
        h.update(c.data)
        out.append((f"{DEFAULT_ALGORITHM}:{h.hexdigest()}", c.offset, c.length))
    return Cut(f"{DEFAULT_ALGORITHM}:{whole.hexdigest()}", reader.size, out)


# -- the recipe ------------------------------------------------------------------------------
def encode(oid: str, size: int, chunks) -> bytes:
    """The stored bytes of a recipe (``chunks``: (id, offset, length) or (id, length))."""
    lines = [MAGIC, f"{oid} {size}\n".encode("ascii")]
    lines += [f"{c[0]} {c[-1]}\n".encode("ascii") for c in chunks]
    return zlib.compress(b"".join(lines), 6)


def id_of(data: bytes) -> str:
    h = hasher(DEFAULT_ALGORITHM)
    h.update(data)
    return f"{DEFAULT_ALGORITHM}:{h.hexdigest()}"


def parse(data: bytes, rid: str, oid: str, size: int | None) -> list[tuple[str, int]]:
    """The chunks (id, length) of the recipe ``rid`` for ``oid`` of ``size`` bytes (None: the
    size the recipe gives). Parsing is validation: the bytes must hash to ``rid``, inflate
    within limits, name exactly this file and size, list valid ids with lengths that add up to
    the size. RecipeError (one line)."""
    what = f"recipe {rid[:19]} of {oid[:19]}"
    if not is_valid_oid(rid) or id_of(data) != rid:
        raise RecipeError(f"{what}: its bytes do not match its id")
    try:
        text = snapshot.inflate_at_most(data, MAX_TEXT)
    except ValueError:
        raise RecipeError(f"{what}: larger than {MAX_TEXT >> 20} MiB once inflated, or truncated") from None
    if text is None:
        raise RecipeError(f"{what}: not a recipe (cannot inflate)")
    if not text.startswith(MAGIC) or not text.endswith(b"\n"):
        raise RecipeError(f"{what}: not a recipe")
    lines = text[len(MAGIC):-1].split(b"\n")
    if len(lines) - 1 > MAX_COUNT:
        raise RecipeError(f"{what}: lists {len(lines) - 1} chunks, more than {MAX_COUNT}")
    if size is None:
        head = lines[0].split(b" ")
        if len(head) == 2 and head[0] == oid.encode("ascii") and head[1].isdigit() and len(head[1]) <= 18:
            size = int(head[1])
    if lines[0] != f"{oid} {size}".encode("ascii"):
        raise RecipeError(f"{what}: it is the recipe of another file ({lines[0][:90].decode('ascii', 'replace')})")
    out = []
    total = 0
    for line in lines[1:]:
        m = _LINE.match(line)
        if not m:
            raise RecipeError(f"{what}: malformed line {line[:90].decode('ascii', 'replace')!r}")
        n = int(m.group(3))
        if n > MAX_LENGTH:
            raise RecipeError(f"{what}: a chunk of {n} bytes (more than {MAX_LENGTH >> 20} MiB)")
        total += n
        if total > size:
            raise RecipeError(f"{what}: its chunks add up to more than the file's {size} bytes")
        out.append((line.split(b" ")[0].decode("ascii"), n))
    if total != size:
        raise RecipeError(f"{what}: its chunks add up to {total} bytes, not the file's {size}")
    return out


def pointer_name(oid: str) -> str:
    algorithm, hexd = split_oid(oid)
    return f"{POINTERS}/{algorithm}-{hexd}"


def encode_pointer(rid: str, stored: int) -> bytes:
    return snapshot.encode_pointer(POINTER_MAGIC, rid, stored)


def decode_pointer(data: bytes) -> tuple[str, int] | None:
    return snapshot.decode_pointer(data, POINTER_MAGIC, MAX_RECIPE)


# -- reading -------------------------------------------------------------------------------
def recipe_on(remote, oid: str, size: int | None, pm, session) -> tuple[str, int, list[tuple[str, int]]] | None:
    """(recipe id, its stored size, its chunks) of ``oid`` on ``remote``; None if the remote has
    no pointer for it. RecipeError for a pointer or recipe that is not valid; RemoteError if
    the remote cannot be reached."""
    data = pm.hook.read_meta(remote=remote, name=pointer_name(oid), session=session)
    if not data:
        return None
    ptr = decode_pointer(bytes(data))
    if ptr is None:
        raise RecipeError(f"remote {remote.name!r}: the recipe pointer of {oid[:19]} is malformed")
    rid, stored = ptr
    fd = os.memfd_create("jam-recipe", os.MFD_CLOEXEC)
    try:
        ok = pm.hook.fetch(remote=remote, oid=rid, dest=Path(fd_path(fd)), size=stored, session=session)
        if ok is None:
            raise RemoteError(f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}")
        if ok is not True:
            raise RecipeError(f"remote {remote.name!r}: the recipe {rid[:19]} of {oid[:19]} is missing")
        if os.fstat(fd).st_size != stored:
            raise RecipeError(f"remote {remote.name!r}: the recipe {rid[:19]} of {oid[:19]} has the wrong size")
        data = os.pread(fd, stored, 0)
    finally:
        os.close(fd)
    return rid, stored, parse(data, rid, oid, size)


def pieces_needed(remote, needed: set[str], pm, session) -> tuple[set[str], list[str]]:
    """(recipes and chunks on ``remote`` that objects in ``needed`` are made of, problems).
    For gc: a root that refers to a large file by its whole id (a clone that never committed
    knows no recipe) still needs the pieces its stub comes back from. Read from the remote's
    own pointers (``meta/recipes/``): whoever wrote them, they are kept. A pointer or recipe
    of a needed object that cannot be read is a problem (the caller then removes nothing)."""
    names = pm.hook.list_meta(remote=remote, prefix=POINTERS, session=session)
    if names is None:
        return set(), [f"remote {remote.name!r}: its backend cannot list jam's metadata; nothing removed"]
    keep: set[str] = set()
    problems: list[str] = []
    for name in names:
        base = name.rpartition("/")[2]
        algorithm, _, hexd = base.partition("-")
        oid = f"{algorithm}:{hexd}"
        if name != f"{POINTERS}/{base}" or oid not in needed or not is_valid_oid(oid):
            continue
        try:
            got = recipe_on(remote, oid, None, pm, session)
        except RecipeError as exc:
            problems.append(f"{describe(exc)}; the pieces of {oid[:19]} cannot be told apart: nothing removed")
            continue
        if got is not None:
            keep.add(got[0])
            keep.update(c for c, _n in got[2])
    return keep, problems


def assemble(remote, oid: str, size: int, dest_fd: int, pm, session) -> bool:
    """Write ``oid`` into ``dest_fd`` (empty) from its chunks on ``remote``: False if the
    remote has no recipe for it; True once every chunk, verified by its id, is at its offset
    (the caller verifies the whole). RecipeError/IntegrityError for a bad recipe or chunk;
    RemoteError if the remote cannot be reached."""
    got = recipe_on(remote, oid, size, pm, session)
    if got is None:
        return False
    _rid, _stored, chunks = got
    offsets: dict[str, list[int]] = {}
    lengths: dict[str, int] = {}
    off = 0
    for cid, n in chunks:
        offsets.setdefault(cid, []).append(off)
        if lengths.setdefault(cid, n) != n:
            raise RecipeError(f"remote {remote.name!r}: the recipe of {oid[:19]} gives {cid[:19]} two lengths")
        off += n
    for batch in _batches(list(offsets), lengths):
        _fetch_chunks(remote, batch, lengths, offsets, dest_fd, pm, session)
    os.ftruncate(dest_fd, size)  # a recipe whose chunks end early leaves no hole unnoticed: the hash fails
    return True


def _batches(cids: list[str], lengths: dict[str, int]):
    """At most FETCH_BATCH chunks and BATCH_BYTES at once (each is held in memory)."""
    batch: list[str] = []
    size = 0
    for cid in cids:
        if batch and (len(batch) >= FETCH_BATCH or size + lengths[cid] > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(cid)
        size += lengths[cid]
    if batch:
        yield batch


def _fetched(remote, cids: list[str], lengths, fds: dict[str, int], pm, session):
    """Fetch ``cids`` from ``remote`` into their memory files ``fds`` (``fetch_many`` where the
    backend offers it, else ``fetch`` each) and yield (id, bytes), each verified by its size
    and its id. RecipeError/IntegrityError for a missing or corrupt chunk; RemoteError passes."""
    items = [(cid, Path(fd_path(fds[cid])), lengths[cid]) for cid in cids]
    outcomes = dict(pm.hook.fetch_many(remote=remote, items=items, session=session) or ())
    for cid, dest, n in items:
        if cid not in outcomes:
            try:
                outcomes[cid] = pm.hook.fetch(remote=remote, oid=cid, dest=dest, size=n, session=session)
            except RemoteError:
                raise
            except (JamError, OSError) as exc:
                outcomes[cid] = exc
    for cid in cids:
        outcome = outcomes.get(cid)
        if isinstance(outcome, Exception):
            raise RecipeError(f"remote {remote.name!r}: chunk {cid[:19]}: {describe(outcome)}")
        if outcome is not True:
            raise RecipeError(f"remote {remote.name!r}: chunk {cid[:19]} of a recipe is missing")
        fd, n = fds[cid], lengths[cid]
        if os.fstat(fd).st_size != n:
            raise IntegrityError(f"remote {remote.name!r}: chunk {cid[:19]} has the wrong size")
        data = os.pread(fd, n, 0)
        algorithm, _ = split_oid(cid)
        h = hasher(algorithm)
        h.update(data)
        if f"{algorithm}:{h.hexdigest()}" != cid:
            raise IntegrityError(f"remote {remote.name!r} returned a corrupt chunk {cid[:19]}")
        yield cid, data


def _fetch_chunks(remote, cids: list[str], lengths, offsets, dest_fd: int, pm, session) -> None:
    fds: dict[str, int] = {}
    try:
        for cid in cids:
            fds[cid] = os.memfd_create("jam-chunk", os.MFD_CLOEXEC)
        for cid, data in _fetched(remote, cids, lengths, fds, pm, session):
            n = lengths[cid]
            for off in offsets[cid]:
                done = 0
                while done < n:
                    done += os.pwrite(dest_fd, memoryview(data)[done:], off + done)
    finally:
        for fd in fds.values():
            os.close(fd)


def assemble_absent(remote, items, outcomes: dict, pm, session) -> None:
    """For checkout's ``fetch_from``: each object ``remote`` said it does not have (outcome
    False) is assembled from its chunks there if it has a recipe (outcome True, or the
    problem); the caller then verifies the whole id as for any fetch. RemoteError passes."""
    for oid, dest, size in items:
        if outcomes.get(oid, False) is not False:
            continue
        fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            outcomes[oid] = assemble(remote, oid, size, fd, pm, session)
        except RemoteError:
            raise
        except (JamError, OSError) as exc:
            outcomes[oid] = JamError(f"{describe(exc)}; stub left as it was")
        finally:
            os.close(fd)


def held(remote, oid: str, size: int, pm, session, listing: dict[str, int] | None = None) -> bool:
    """Whether ``remote`` holds ``oid`` as chunks: its recipe pointer, the recipe (verified)
    and every chunk listed there (``listing``: {oid: size} of one ``list_objects``, else
    ``has`` per chunk). For ``jam doctor``."""
    try:
        got = recipe_on(remote, oid, size, pm, session)
    except RecipeError:
        return False
    if got is None:
        return False
    rid, stored, chunks = got
    for cid, n in {c: n for c, n in chunks}.items():
        if listing is not None:
            if listing.get(cid) != n:
                return False
        elif pm.hook.has(remote=remote, oid=cid, size=n, session=session) is not True:
            return False
    return True


# -- writing (``jam commit``) --------------------------------------------------------------
@dataclass
class _Rec:
    oid: str
    size: int


@dataclass
class _Piece:
    """A chunk (or the recipe) on its way, in an anonymous memory file (``store_on``'s shape)."""

    record: _Rec
    fd: int


def _piece(oid: str, data: bytes) -> _Piece:
    fd = os.memfd_create("jam-chunk", os.MFD_CLOEXEC)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, memoryview(data)[done:])
    except BaseException:
        os.close(fd)
        raise
    return _Piece(_Rec(oid, len(data)), fd)


def store_file(root, pm, session, ix, recorder, remotes, fd: int, c: Cut, out) -> str:
    """Store the file ``fd`` (cut as ``c``) on the remotes ``place`` chooses as chunks: only
    the chunks a remote lacks (the index knows, else one listing or ``has``), then the recipe,
    then (all durable) its pointer. Records the recipe and where each piece is in the index.
    Returns "" when every chosen remote holds it, else why not (the file is then skipped)."""
    from jam_core.ops.remotes import ensure_identity
    from jam_core.ops.stash import Skip, choose_remotes, store_on
    from jam_core.placement import Candidates, copies_of

    by_name = {r.name: r for r in remotes}
    try:
        targets = [n for n in choose_remotes(root, pm, c.oid, c.size, Candidates(remotes, copies_of(root.config)))
                   if n in by_name]
    except Skip as exc:
        return str(exc)
    except JamError as exc:
        return describe(exc)
    if not targets:
        return "no remote to store it on"
    recipe = encode(c.oid, c.size, c.chunks)
    rid = id_of(recipe)
    first: dict[str, tuple[int, int]] = {}
    for cid, off, n in c.chunks:
        first.setdefault(cid, (off, n))
    pieces = set(first) | {rid}
    newly: dict[str, int] = {}
    for name in targets:
        remote = by_name[name]
        try:
            ensure_identity(root, remote, pm, session)
            recorder.before_store(remote, pieces | {c.oid})
            if pm.hook.has(remote=remote, oid=c.oid, size=c.size, session=session) is True:
                ix.record_stored([(c.oid, name)])  # stored whole already (a stash): nothing to cut up
                continue
            there = ix.stored_by(remote.name)
            unknown = {cid: first[cid][1] for cid in first if cid not in there}
            if len(unknown) > 64:
                listing = pm.hook.list_objects(remote=remote, session=session, sweep=False)
            else:
                listing = None
            if listing is not None:
                present = {o for o, n in listing if unknown.get(o) == n}
            else:
                present = {o for o, n in unknown.items()
                           if pm.hook.has(remote=remote, oid=o, size=n, session=session) is True}
            lacking = [cid for cid in unknown if cid not in present]
            for group in _batches(lacking, {cid: first[cid][1] for cid in lacking}):
                batch = []
                try:
                    for cid in group:
                        off, n = first[cid]
                        batch.append(_piece(cid, os.pread(fd, n, off)))
                    for p, err in store_on(remote, batch, pm, session):
                        if err is not None:
                            return f"remote {name!r}: chunk {p.record.oid[:19]}: {describe(err)}"
                        newly[p.record.oid] = p.record.size
                finally:
                    for p in batch:
                        os.close(p.fd)
            p = _piece(rid, recipe)
            try:
                for _p, err in store_on(remote, [p], pm, session):
                    if err is not None:
                        return f"remote {name!r}: its recipe: {describe(err)}"
                    newly[rid] = len(recipe)
            finally:
                os.close(p.fd)
            pm.hook.sync(remote=remote, session=session)
            if pm.hook.write_meta(remote=remote, name=pointer_name(c.oid), data=encode_pointer(rid, len(recipe)),
                                  session=session) is None:
                return f"remote {name!r}: its backend cannot write jam's metadata (no write_meta)"
            going = recorder.removing_elsewhere(remote)
            if going & (pieces | {c.oid}):
                return f"another root is removing part of it from {name!r} at this moment"
        except (JamError, OSError) as exc:
            if isinstance(exc, RemoteError):
                out.problems.append(f"remote {name!r}: {describe(exc)}")
            return f"remote {name!r}: {describe(exc)}"
        ix.record_recipe(c.oid, c.size, rid, len(recipe), [(cid, n) for cid, _off, n in c.chunks])
        ix.record_stored([(o, name) for o in pieces | {c.oid}])
    out.uploaded += len(newly)
    out.bytes += sum(newly.values())
    return ""


def complete(root, pm, session, ix, remote, missing: dict[str, int], others, listing=None) -> set[str]:
    """For ``store.complete``: make ``remote`` hold as chunks each object of ``missing`` (oid ->
    size) that is chunked: its recipe (the index's, else found on ``remote`` or on one of
    ``others``, verified, then remembered) and every chunk, what it lacks copied from the other
    remotes (``ops.copies.copy_objects``: verified), then its pointer. Returns the objects it
    now holds (recorded as stored there). ``listing``: {oid: size} of ``remote``, if known."""
    from jam_core.ops.copies import copy_objects

    done: set[str] = set()
    there = ix.stored_by(remote.name)
    for oid, size in missing.items():
        rec = ix.recipe_of(oid)
        found: set[str] = set()
        if rec is None:
            for r in [remote, *others]:
                try:
                    got = recipe_on(r, oid, size, pm, session)
                except RecipeError:
                    continue
                if got is not None:
                    ix.record_recipe(oid, size, got[0], got[1], got[2])
                    rec = ix.recipe_of(oid)
                    found.add(r.name)
                    break
        if rec is None:
            continue
        rid, stored, sizes = rec
        need = {rid: stored, **sizes}
        unknown = {o: n for o, n in need.items() if o not in there}
        if listing is None and len(unknown) > 64:
            got_listing = pm.hook.list_objects(remote=remote, session=session, sweep=False)
            listing = dict(got_listing) if got_listing is not None else {}
        if listing is not None:
            present = {o for o, n in unknown.items() if listing.get(o) == n}
        else:
            present = {o for o, n in unknown.items()
                       if pm.hook.has(remote=remote, oid=o, size=n, session=session) is True}
        lacking = {o: n for o, n in unknown.items() if o not in present}
        if lacking:
            _copied, failed = copy_objects(root, pm, session, remote, lacking,
                                           holders=lambda o, near=found: ix.stored_on(o) | near)
            if failed:
                continue
        pm.hook.write_meta(remote=remote, name=pointer_name(oid), data=encode_pointer(rid, stored), session=session)
        ix.record_stored([(o, remote.name) for o in [*need, oid]])
        there |= set(need)
        done.add(oid)
    return done


# -- copies and moves (``jam copy``, ``jam move``, ``jam remote remove --move-to``) ----------------
class Pieces:
    """What ``ops.copies`` needs to carry, verify and remove an object a remote holds only as
    content-defined chunks (a large file committed, never stashed whole). ``ops.copies`` sits
    below this module in the layers (its ``copy_objects`` is used here), so its callers hand it
    one of these; without it, copies move whole objects only.

    * ``carry``: the recipe (verified by its id and validated) read on the source, then the
      recipe object and every chunk the destination lacks, each through ``copy_objects``
      (fetched, hashed against its id, stored, verified by the backend; the source first, then
      any other remote of the root), the destination made durable, and only then its pointer
      (``write_meta``: atomic). A piece that cannot be copied: nothing is pointed at.
    * ``verified``: the pointer, the recipe (verified) and every chunk hashed in place where the
      backend can (else its size): a copy that counts before anything leaves the source.
    * ``pointed``, ``of``, ``shared``, ``forget``: for the guarded removal of an object's
      pieces from the source (``copies.remove_copies``): which objects have a pointer there,
      the pieces of one, the pieces other needed objects share (``pieces_needed``: never
      removed), and the pointer emptied once its pieces are gone (an empty pointer is no
      pointer: ``recipe_on``)."""

    def __init__(self, root, pm, session):
        self.root, self.pm, self.session = root, pm, session

    def carry(self, src, dest, oid: str, size: int, recorder) -> bool:
        """Make ``dest`` hold ``oid`` as its pieces, read from ``src``'s recipe. False if
        ``src`` has no recipe for it; raises (one line) if a piece cannot be copied."""
        from jam_core.ops.copies import copy_objects

        pm, session = self.pm, self.session
        got = recipe_on(src, oid, size, pm, session)
        if got is None:
            return False
        rid, stored, listed = got
        need = {rid: stored, **dict(listed)}
        recorder.before_store(dest, set(need) | {oid})  # referenced there before any piece lands
        lacking = self._lacking(dest, need)
        if lacking:
            try:
                self._copy_batched(src, dest, lacking)
                failed = {}
            except (JamError, OSError):  # piece by piece, from any remote that holds each (verified)
                _copied, failed = copy_objects(self.root, pm, session, dest, lacking,
                                               holders=lambda _o: {src.name}, recorder=recorder)
            if failed:
                piece, why = next(iter(failed.items()))
                raise RecipeError(f"{len(failed)} of the {len(need)} pieces of {oid[:19]} not copied to "
                                  f"{dest.name!r} (piece {piece[:19]}: {why})")
        pm.hook.sync(remote=dest, session=session)
        going = recorder.removing_elsewhere(dest)
        if going & set(need):
            raise RecipeError(f"another root is removing pieces of {oid[:19]} from {dest.name!r} at this moment")
        _pointer_written(dest, oid)  # the instant before the pointer (tests inject faults here)
        if pm.hook.write_meta(remote=dest, name=pointer_name(oid), data=encode_pointer(rid, stored),
                              session=session) is None:
            raise RemoteError(f"remote {dest.name!r}: its backend cannot write jam's metadata (no write_meta)")
        self._remember(oid, size, rid, stored, listed, dest.name)
        return True

    def _copy_batched(self, src, dest, lacking: dict[str, int]) -> None:
        """Copy the pieces ``lacking`` from ``src`` to ``dest`` in memory-bounded batches: each
        batch fetched at once into memory files and verified by its ids (``_fetched``), then
        stored at once (``ops.stash.store_on``: the backend verifies again). Raises at the first
        problem (the caller then copies piece by piece)."""
        from jam_core.ops.stash import store_on

        for batch in _batches(list(lacking), lacking):
            fds: dict[str, int] = {}
            try:
                for cid in batch:
                    fds[cid] = os.memfd_create("jam-chunk", os.MFD_CLOEXEC)
                ready = [_Piece(_Rec(cid, lacking[cid]), fds[cid])
                         for cid, _data in _fetched(src, batch, lacking, fds, self.pm, self.session)]
                for p, err in store_on(dest, ready, self.pm, self.session):
                    if err is not None:
                        raise RecipeError(f"remote {dest.name!r}: piece {p.record.oid[:19]}: {describe(err)}")
            finally:
                for fd in fds.values():
                    os.close(fd)

    def _lacking(self, remote, need: dict[str, int]) -> dict[str, int]:
        """The pieces ``remote`` does not hold (by size), asked after this command's refs on it
        name them (so what is listed present stays): one listing when there are many, else
        ``has`` per piece."""
        pm, session = self.pm, self.session
        listing = None
        if len(need) > 64:
            got = pm.hook.list_objects(remote=remote, session=session, sweep=False)
            listing = dict(got) if got is not None else None
        if listing is not None:
            return {o: n for o, n in need.items() if listing.get(o) != n}
        return {o: n for o, n in need.items() if pm.hook.has(remote=remote, oid=o, size=n, session=session) is not True}

    def _remember(self, oid: str, size: int, rid: str, stored: int, listed, remote: str) -> None:
        """The history index (if the root has one) learns the recipe, so the kept union counts
        its pieces (gc, drop and move of this root keep them where a kept snapshot needs it)."""
        from jam_core.history.index import Index, exists

        if not exists(self.root):
            return
        with Index(self.root) as ix:
            ix.record_recipe(oid, size, rid, stored, listed)
            ix.record_stored([(o, remote) for o in {rid, oid, *(c for c, _n in listed)}])

    def held(self, remote, oid: str, size: int) -> bool:
        return held(remote, oid, size, self.pm, self.session)

    def verified(self, remote, oid: str, size: int) -> bool:
        """``remote`` holds an intact ``oid`` as chunks: its recipe verified, every chunk hashed
        in place where the backend can (else its size)."""
        from jam_core.ops.copies import _verified  # the one "intact copy, asked live" check

        pm, session = self.pm, self.session
        try:
            got = recipe_on(remote, oid, size, pm, session)
        except RecipeError:
            return False
        if got is None:
            return False
        return all(_verified(remote, cid, n, pm, session) for cid, n in dict(got[2]).items())

    def pointed(self, remote) -> set[str]:
        """The whole ids ``remote`` has a recipe pointer for (empty ones included)."""
        names = self.pm.hook.list_meta(remote=remote, prefix=POINTERS, session=self.session) or ()
        out = set()
        for name in names:
            base = name.rpartition("/")[2]
            algorithm, _, hexd = base.partition("-")
            oid = f"{algorithm}:{hexd}"
            if name == f"{POINTERS}/{base}" and is_valid_oid(oid):
                out.add(oid)
        return out

    def of(self, remote, oid: str, size: int) -> tuple[str, dict[str, int]] | None:
        """(recipe id, {piece: size}: the chunks then the recipe) of ``oid`` on ``remote``; None
        without a pointer. RecipeError if the pointer or recipe cannot be read."""
        got = recipe_on(remote, oid, size, self.pm, self.session)
        if got is None:
            return None
        rid, stored, listed = got
        out = dict(listed)
        out[rid] = stored
        return rid, out

    def shared(self, remote, needed: set[str]) -> tuple[set[str], list[str]]:
        return pieces_needed(remote, needed, self.pm, self.session)

    def forget(self, remote, oid: str) -> None:
        """Empty ``oid``'s pointer on ``remote`` (its pieces are gone from there)."""
        self.pm.hook.write_meta(remote=remote, name=pointer_name(oid), data=b"", session=self.session)


def _pointer_written(remote, oid: str) -> None:
    """The instant before a carried object's pointer is written on ``remote``."""

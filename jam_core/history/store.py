"""``jam commit``: record the tree as a snapshot, its content safe on the remotes.

Under the root's lock: walk the tree (or the named paths; the rest is carried from the parent),
take each stub's id from its record and each local file's from the ids cache (hashed only when
its (dev, ino, size, mtime_ns, ctime_ns) changed), upload the local files whose content no
remote holds (``place`` chooses, refs recorded before each store as a stash does, verified by the
backend, made durable with ``sync``; the files stay local), then record the snapshot locally
(cached bytes, then one db transaction that makes it the head), then push to the head remotes
(``head_remotes``: every durable remote but the embedded local default when there is
another): store every kept snapshot a remote lacks (same hooks), make it hold every object
the head needs (``complete``: what it lacks is copied from the other remotes, verified, by
``ops.copies.copy_objects``), and only then write this machine's head there. A head on a
remote is a promise that a clone from it alone finds every byte; a remote that cannot be
completed gets no head (one problem line naming it and what it lacks).

Killed at any instant, nothing is lost: before the local record nothing refers to the uploads
(they become collectable, the next commit uploads what is missing); after it, the next commit
(or any later one) pushes what a remote lacks and writes the head.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from jam_core.catalog import Catalog
from jam_core.errors import JamError, RemoteError, UsageError, describe
from jam_core.fs import NotTheFile, fd_path, open_regular, raise_fd_limit, same_dir, same_file, tmp_name
from jam_core.history import index as index_module
from jam_core.history.index import Index
from jam_core.history.snapshot import (
    FILE,
    LINK,
    Item,
    Snapshot,
    SnapshotError,
    changes,
    encode,
    machine_id,
    parse,
    tree_name,
)
from jam_core.model import Remote, Session
from jam_core.objects import DEFAULT_ALGORITHM, hash_fd
from jam_core.root import CATALOG, Root
from jam_core.scan import DIRTY, LOCAL, STUB

HEADS = "history"
REGISTRY = "history-trees"  # meta/history-trees/<tree>: a tree's name, for backends that list files only
HEAD_MAGIC = b"jam-head 1\n"
BATCH_BYTES = 256 << 20
SETID = stat.S_ISUID | stat.S_ISGID  # never made from a snapshot (EntryMaker)
STUB_BIT = 0o1000000  # in the ids cache's mode: that (dev, ino) was a stub (its content is on the remotes)
BATCH_FILES = 2048  # each file of a batch is held open; one sync per remote per batch


def head_name(tree: str, machine: str) -> str:
    """The meta name of one machine's head of one tree: ``history/<tree>/<machine id>``."""
    return f"{HEADS}/{tree}/{machine}"


def encode_head(sid: str, size: int) -> bytes:
    """A head: ``jam-head 1``, the snapshot's id, its stored size (a fetch needs both)."""
    from jam_core.history.snapshot import encode_pointer

    return encode_pointer(HEAD_MAGIC, sid, size)


def decode_head(data: bytes) -> tuple[str, int] | None:
    """(snapshot id, stored size) a head names, or None if it is not a valid head."""
    from jam_core.history.snapshot import MAX_TEXT, decode_pointer

    return decode_pointer(data, HEAD_MAGIC, MAX_TEXT)


@dataclass
class CommitResult:
    id: str = ""
    files: int = 0
    added: int = 0
    modified: int = 0
    deleted: int = 0
    uploaded: int = 0  # new objects stored on a remote
    bytes: int = 0
    nothing: str = ""  # why no snapshot was made ("" if one was)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): left as in the parent
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems or self.skipped else 0


@dataclass
class _Rec:
    oid: str
    size: int


@dataclass
class _Up:
    """A local file on its way to the remotes: open, hashed (``store_on``'s item shape)."""

    rel: str
    record: _Rec
    fd: int
    mode: int
    mtime_ns: int
    failed: str = ""


def durable_remotes(root: Root) -> list[Remote]:
    from jam_core.placement import is_cache

    return [r for r in sorted(root.remotes(), key=lambda r: (r.tier, r.name)) if not is_cache(r)]


def under(path: str, rels: list[str]) -> bool:
    return any(r == "." or path == r or path.startswith(r + "/") for r in rels)


# -- the scan --------------------------------------------------------------------------------
def scan(root: Root, rels: list[str], ix: Index, skipped: list, stored: set[str] | None = None
         ) -> tuple[dict[str, Item], list, list]:
    """Walk ``rels`` (the one walk, ``scan.scan_stats``): (items known without hashing, local
    files to hash as scan Entries, new rows for the ids cache). A file whose (dev, ino, size,
    mtime_ns, ctime_ns) is in the ids cache is taken from it without opening it (with
    ``stored``, a commit's: a local file only if a remote holds its content, else it is
    hashed and uploaded: the cache may come from a ``jam diff``); any other is classified (a
    stub gives its record; its cache row is marked ``STUB_BIT``). A path that does not exist
    is simply absent. Stubs written into and unreadable stub metadata go to ``skipped`` (the
    parent's entry is kept)."""
    import errno

    from jam_core.fs import is_jam_tmp
    from jam_core.scan import Entry, classify, gc_paused, scan_stats

    items: dict[str, Item] = {}
    pending = []
    learned = []
    cache = ix.ids()

    def on_error(rel, exc):
        if getattr(exc, "errno", None) == errno.ENOENT and rel in rels:
            return
        skipped.append((rel, describe(exc)))

    def tidy(dir_fd, dir_rel, entries):  # the same walk finds the symlinks
        if not entries and dir_rel != "." and _foreign_dir(dir_fd):
            skipped.append((dir_rel, FOREIGN))  # (see settle_foreign)
            return entries
        prefix = "" if dir_rel == "." else dir_rel + "/"
        for e in entries:
            if e.is_symlink() and not is_jam_tmp(e.name) and not (not prefix and e.name == ".jam"):
                try:
                    target = os.readlink(e.name, dir_fd=dir_fd)
                    st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                rel = prefix + e.name
                if target and under(rel, rels):
                    items[rel] = Item(rel, LINK, mtime_ns=st.st_mtime_ns, target=target)
        return entries

    for rel in rels:  # a symlink named itself (the walk yields only what is under a directory)
        if rel == ".":
            continue
        from jam_core.fs import open_dir

        parent, _, name = rel.rpartition("/")
        try:
            fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dfd = open_dir(fd, parent) if parent else os.dup(fd)
            finally:
                os.close(fd)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=dfd)
                    if target:
                        items[rel] = Item(rel, LINK, mtime_ns=st.st_mtime_ns, target=target)
            finally:
                os.close(dfd)
        except OSError:
            pass  # missing, or reached through a symlink: the walk says so or it is absent
    top = str(root.path).rstrip("/") + "/"
    get = cache.get
    with gc_paused():
        for rel in rels:
            for d, base, names, stats in scan_stats(str(root.path), rel, on_error, tidy=tidy):
                prefix = "" if d == "." else d + "/"
                for name, st in zip(names, stats, strict=True):
                    path = prefix + name
                    hit = get((st.st_dev, st.st_ino))
                    if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns \
                            and hit[2] == st.st_ctime_ns and (stored is None or hit[4] & STUB_BIT or not hit[0]
                                                              or hit[3] in stored):
                        items[path] = Item(path, FILE, hit[3], st.st_size, hit[4] & 0o7777, st.st_mtime_ns)
                        continue
                    state, rec, problem = classify(base + name, st)
                    if state == STUB:
                        items[path] = Item(path, FILE, rec.oid, rec.size, rec.mode, rec.mtime_ns)
                        learned.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, rec.oid,
                                        rec.mode | STUB_BIT))
                    elif state == LOCAL:
                        pending.append(Entry(path, top + path, st, state, None, "", d))
                    elif state == DIRTY:
                        skipped.append((path, "a stub that was written into: left as in the last snapshot "
                                              "(see `jam doctor`)"))
                    else:
                        skipped.append((path, f"unreadable stub metadata ({problem}): left as in the last snapshot"))
    return items, pending, learned


FOREIGN = "holds another jam root or a remote's identity marker, so it is not walked: left as in the last snapshot"


def _foreign_dir(dir_fd: int) -> bool:
    """Does this directory (the walk found it empty: it may have been skipped) hold another
    root or a remote? The walk's own test, on its listing."""
    from jam_core.scan import _foreign

    try:
        with os.scandir(dir_fd) as it:
            entries = list(it)
    except OSError:
        return False
    return bool(entries) and _foreign(dir_fd, entries)


def settle_foreign(skipped: list, old: dict) -> list:
    """The walk skips a directory that holds another root or a remote (``FOREIGN``). One the
    last snapshot had files under became one since (a ``jam-remote.json`` or a ``.jam`` that
    came from another machine, or made here): its files are carried, never taken for deleted
    (the next commit would delete them on every machine), and it is said. One it had nothing
    under (a root of its own nested in this one) is no news: dropped from ``skipped``."""
    out = []
    for p, why in skipped:
        if why == FOREIGN and not any(q.startswith(p + "/") for q in old):
            continue
        out.append((p, why))
    return out


class OneDir:
    """The descriptor of one directory at a time (files come directory by directory from the
    walk): a tree of 100,000 directories never holds 100,000 descriptors, as a cache would."""

    def __init__(self, root_path):
        self.root_fd = os.open(root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.rel: str | None = None
        self.fd = -1

    def get(self, rel: str) -> int:
        from jam_core.fs import open_dir

        if rel != self.rel:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd, self.rel = -1, None
            self.fd = open_dir(self.root_fd, rel) if rel != "." else os.dup(self.root_fd)
            self.rel = rel
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        os.close(self.root_fd)

    def __enter__(self) -> "OneDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hash_one(dirs: "OneDir", e) -> tuple[int, str] | None:
    """Open and hash a local file; (fd, oid) with the fd still open, or None if it changed."""
    name = e.rel.rpartition("/")[2]
    try:
        fd = open_regular(dirs.get(e.dir), name, expect=e.st)
    except (NotTheFile, FileNotFoundError):
        return None
    try:
        st0 = os.fstat(fd)
        if not same_file(st0, e.st):
            os.close(fd)
            return None
        oid, size = hash_fd(fd, DEFAULT_ALGORITHM)
        if size != st0.st_size or not same_file(os.fstat(fd), st0):
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    return fd, oid


# -- making entries (restore, clone, sync) ----------------------------------------------------
class EntryMaker:
    """Makes the entries of one batch (a stub, an empty file, a symlink) from snapshot items:
    the one way ``restore``, ``clone`` and ``sync`` make them. A stub's header block is
    ``StubRecord.header`` and its ``user.jam`` packed directly: the
    items were validated when their snapshot was parsed. Nothing is made durable here: the
    caller makes the whole batch durable with one ``syncfs`` (an fsync per file dominates
    the cost of small stubs)."""

    def __init__(self, stamp: str, now_ns: int):
        from jam_core.stub import _ALGO_CODE, _PACK, VERSION, XATTR, StubRecord

        self.stamp, self.now_ns = stamp, now_ns
        self._pack, self._codes = _PACK.pack, _ALGO_CODE
        self._version, self._record = VERSION, StubRecord
        self._xattr = XATTR

    def make(self, dfd: int, fname: str, name: str, item: Item, remotes: tuple[str, ...],
             want_stat: bool = False):
        """Make ``item`` as ``fname`` in ``dfd`` (created exclusively, never through a symlink;
        its header names ``name``). Returns (StubRecord or None, its fstat or None): the stat
        is taken last, so its ctime is the one a scan sees while nothing renames the entry."""
        if item.kind == LINK:
            os.symlink(item.target, fname, dir_fd=dfd)
            os.utime(fname, ns=(item.mtime_ns, item.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            return None, None
        fd = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        # A snapshot is input (another machine's, or a remote others can write): only the
        # permission bits and the sticky bit are made, never setuid/setgid (a root that syncs
        # would hold a setuid-root program whose bytes another machine chose), as git does.
        mode = item.mode & ~SETID
        try:
            if item.size == 0:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(item.mtime_ns, item.mtime_ns))
                return None, None
            rec = self._record(item.oid, item.size, mode, item.mtime_ns, remotes, self.stamp)
            header = rec.header(name)
            if len(header) > item.size:
                header = header[:item.size]
            os.write(fd, header)
            if item.size > len(header):
                os.ftruncate(fd, item.size)
            algorithm, _, digest = item.oid.partition(":")
            os.setxattr(fd, self._xattr, self._pack(self._version, self._codes[algorithm], bytes.fromhex(digest),
                                              item.size, mode, item.mtime_ns))
            os.fchmod(fd, mode & ~0o222)
            os.utime(fd, ns=(self.now_ns, item.mtime_ns))
            return rec, (os.fstat(fd) if want_stat else None)
        except BaseException:
            os.close(fd)
            fd = -1
            os.unlink(fname, dir_fd=dfd)
            raise
        finally:
            if fd >= 0:
                os.close(fd)


def make_entry(dfd: int, name: str, item: Item, remotes: tuple[str, ...], stamp: str, now_ns: int,
               maker: EntryMaker | None = None):
    """Make ``item`` under a temporary name in ``dfd`` (``EntryMaker``; pass one ``maker`` for
    a batch). Returns (temporary name, StubRecord or None). Not yet durable: the caller
    renames it in and makes the whole batch durable with one ``syncfs``."""
    tmp = tmp_name()
    rec, _st = (maker or EntryMaker(stamp, now_ns)).make(dfd, tmp, name, item, remotes)
    return tmp, rec


# -- commit ------------------------------------------------------------------------------------
def auto_interval(root: Root) -> float | None:
    from jam_core.units import parse_duration

    table = root.config.get("history", {})
    if not isinstance(table, dict):
        raise UsageError(f"{root.config_path}: 'history' must be a table")
    value = table.get("auto")
    if value is None or value is False:
        return None
    return parse_duration(value, "history.auto")


def commit(root: Root, pm, message: str = "", rels: list[str] | None = None, session: Session | None = None,
           auto: bool = False, now_ns: int | None = None) -> CommitResult:
    """Snapshot the tree (``rels``: only these paths are looked at; the rest is carried from
    the parent). See the module's docstring for the order of the steps."""
    session = session or Session()
    rels = list(rels or ["."])
    out = CommitResult()
    remotes = durable_remotes(root)
    if not remotes:
        raise UsageError(f"{root.path} has no remote (add one with `jam remote add NAME URL`)")
    if len(message) > 64 << 10:
        raise UsageError("the message is longer than 64 KiB")
    tree, machine = tree_name(root), machine_id()
    interval = auto_interval(root) if auto else None
    if auto and interval is None:
        out.nothing = "history.auto is not set in .jam/config.toml; nothing done"
        return out
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat, Index(root) as ix:
        from jam_core.ops.refs import Recorder

        recorder = Recorder(root, pm, session)
        ix.tidy()
        head = ix.head()
        if auto and head is not None:
            last = ix.rows()[0][1] if ix.rows() else 0
            if (now_ns or time.time_ns()) - last < interval * 1e9:
                out.nothing = "the last commit is recent (history.auto); nothing done"
                return out
        try:
            items = _gather(root, pm, session, rels, ix, recorder, remotes, out)
            if out.problems:  # a remote failed as a whole: a snapshot now would miss files
                out.nothing = "nothing committed (a remote failed; see above)"
                return out
            if any(why == FOREIGN for _p, why in out.skipped):
                out.skipped = settle_foreign(out.skipped, ix.load(head).by_path() if head else {})
            from jam_core.policy.pins import read_pins

            pins = sorted(p for p in read_pins(root))
            if head and rels == ["."] and not out.skipped and _unchanged(ix, head, items, pins):
                out.nothing = "nothing to commit (the tree is as in the last snapshot)"
                out.id, out.files = head, len(items)
                push(root, pm, session, ix, recorder, remotes, tree, machine, out)
                return out
            parent = ix.load(head) if head else None
            old = parent.by_path() if parent else {}
            new = {p: i for p, i in old.items() if not under(p, rels)}
            new.update(items)
            unread = {rel for rel, _why in out.skipped}  # files, or directories that could not be read
            for p, i in old.items():  # left as they were
                if p not in items and under(p, rels) and _in(p, unread):
                    new[p] = i
            added, modified, deleted = changes(old, new)
            out.files = len(new)
            if parent is not None and not (added or modified or deleted) and pins == sorted(parent.pins):
                out.nothing = "nothing to commit (the tree is as in the last snapshot)"
                out.id = head
            else:
                snap = Snapshot([head] if head else [], now_ns or time.time_ns(), socket.gethostname()[:255],
                                machine, tree, message, pins, list(new.values()),
                                parent_sizes=[ix.size_of(head)] if head else [])
                if parent is not None and snap.time_ns <= parent.time_ns:
                    snap.time_ns = parent.time_ns + 1
                stored = encode(snap)
                ix.add(snap, stored, (len(added), len(modified), len(deleted)))
                out.id = snap.id
                out.added, out.modified, out.deleted = len(added), len(modified), len(deleted)
            push(root, pm, session, ix, recorder, remotes, tree, machine, out)
        finally:
            if recorder.pending:
                from jam_core.ops.refs import referenced

                used = [r for r in remotes if r.name in recorder.pending]
                out.problems += recorder.publish(referenced(root, cat), used)
    return out


def _in(path: str, paths: set[str]) -> bool:
    """``path`` or one of its directories is in ``paths``."""
    if path in paths:
        return True
    cut = path.rfind("/")
    while cut > 0:
        if path[:cut] in paths:
            return True
        cut = path.rfind("/", 0, cut)
    return False


def _unchanged(ix: Index, head: str, items: dict[str, Item], pins: list[str]) -> bool:
    """The tree is byte for byte what the newest snapshot recorded (its entry lines and pins
    compared as text: no parse of 100,000 entries to find that nothing changed)."""
    import json

    from jam_core.history.snapshot import MAGIC, body, id_of, inflate

    data = ix.bytes_of(head)
    if data is None or id_of(data) != head:
        return False
    try:
        text = inflate(data, head[:19])
        cut = text.find(b"\n", len(MAGIC))
        if not text.startswith(MAGIC) or cut < 0 or text[cut + 1:] != body(sorted(items.values(),
                                                                                  key=lambda i: i.path)):
            return False
        return sorted(json.loads(text[len(MAGIC):cut]).get("pins", ())) == pins
    except (JamError, ValueError, AttributeError, TypeError):
        return False


def _gather(root: Root, pm, session: Session, rels: list[str], ix: Index, recorder, remotes: list[Remote],
            out: CommitResult) -> dict[str, Item]:
    """Every entry under ``rels``, local files hashed (cache) and uploaded where needed."""
    from jam_core.history.chunks import threshold

    above = threshold(root.config)
    known = ix.all_stored()
    items, pending, learned = scan(root, rels, ix, out.skipped, known)
    per_batch = max(64, min(BATCH_FILES, max(raise_fd_limit(BATCH_FILES + 256), 320) - 256))
    session.begin(sum(e.st.st_size for e in pending))
    with OneDir(root.path) as dirs:
        batch: list[_Up] = []
        size = 0
        new_ids = learned
        for e in pending:
            if e.st.st_size >= above:
                _chunked(root, pm, session, dirs, e, ix, recorder, remotes, items, known, new_ids, out)
                continue
            try:
                got = hash_one(dirs, e)
            except (JamError, OSError) as exc:
                out.skipped.append((e.rel, f"could not be read ({describe(exc)}): left as in the last snapshot"))
                continue
            session.file_done(e.st.st_size)
            if got is None:
                out.skipped.append((e.rel, "changed while it was being read: left as in the last snapshot"))
                continue
            fd, oid = got
            st = e.st
            new_ids.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, oid,
                            st.st_mode & 0o7777))
            item = Item(e.rel, FILE, oid, st.st_size, st.st_mode & 0o7777, st.st_mtime_ns)
            if st.st_size == 0 or oid in known:
                os.close(fd)
                items[e.rel] = item
                continue
            batch.append(_Up(e.rel, _Rec(oid, st.st_size), fd, item.mode, item.mtime_ns))
            size += st.st_size
            if len(batch) >= per_batch or size >= BATCH_BYTES:
                _upload_batch(root, pm, session, batch, ix, recorder, remotes, items, known, out)
                batch, size = [], 0
        if batch:
            _upload_batch(root, pm, session, batch, ix, recorder, remotes, items, known, out)
        ix.remember_ids(new_ids)
    return items


def _chunked(root: Root, pm, session: Session, dirs: "OneDir", e, ix: Index, recorder, remotes: list[Remote],
             items: dict[str, Item], known: set[str], new_ids: list, out: CommitResult) -> None:
    """A file of ``[history] chunk_above`` bytes or more: read once, hashed whole while it is
    cut into content-defined chunks (``chunks.py``); if no remote holds it, only the chunks a
    remote lacks are uploaded, then its recipe."""
    from jam_core.history.chunks import cut, store_file

    name = e.rel.rpartition("/")[2]
    try:
        fd = open_regular(dirs.get(e.dir), name, expect=e.st)
    except (NotTheFile, FileNotFoundError):
        out.skipped.append((e.rel, "changed while it was being read: left as in the last snapshot"))
        return
    except (JamError, OSError) as exc:
        out.skipped.append((e.rel, f"could not be read ({describe(exc)}): left as in the last snapshot"))
        return
    try:
        st0 = os.fstat(fd)
        if not same_file(st0, e.st):
            out.skipped.append((e.rel, "changed while it was being read: left as in the last snapshot"))
            return
        try:
            c = cut(fd)
        except (JamError, OSError) as exc:
            out.skipped.append((e.rel, f"could not be read ({describe(exc)}): left as in the last snapshot"))
            return
        session.file_done(e.st.st_size)
        if c.size != st0.st_size or not same_file(os.fstat(fd), st0):
            out.skipped.append((e.rel, "changed while it was being read: left as in the last snapshot"))
            return
        st = e.st
        new_ids.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, c.oid, st.st_mode & 0o7777))
        item = Item(e.rel, FILE, c.oid, st.st_size, st.st_mode & 0o7777, st.st_mtime_ns)
        if c.oid not in known:
            why = store_file(root, pm, session, ix, recorder, remotes, fd, c, out)
            if why:
                out.skipped.append((e.rel, f"not uploaded ({why}): left as in the last snapshot"))
                return
            known.add(c.oid)
        items[e.rel] = item
    finally:
        os.close(fd)


def _upload_batch(root: Root, pm, session: Session, batch: list[_Up], ix: Index, recorder,
                  remotes: list[Remote], items: dict[str, Item], known: set[str], out: CommitResult) -> None:
    try:
        _upload(root, pm, session, batch, ix, recorder, remotes, known, out)
        for u in batch:
            if u.failed:
                out.skipped.append((u.rel, f"not uploaded ({u.failed}): left as in the last snapshot"))
            else:
                items[u.rel] = Item(u.rel, FILE, u.record.oid, u.record.size, u.mode, u.mtime_ns)
    finally:
        for u in batch:
            if u.fd >= 0:
                os.close(u.fd)
                u.fd = -1


def _upload(root: Root, pm, session: Session, batch: list[_Up], ix: Index, recorder, remotes: list[Remote],
            known: set[str], out: CommitResult) -> None:
    """Store the batch's objects on the remotes ``place`` chose (caches left out), each file
    staying local. A file counts as uploaded once every chosen remote holds it, verified."""
    from jam_core.ops.remotes import ensure_identity
    from jam_core.ops.stash import Skip, choose_remotes, store_on
    from jam_core.placement import Candidates, copies_of

    cands = Candidates(remotes, copies_of(root.config))
    by_name = {r.name: r for r in remotes}
    targets: dict[int, list[str]] = {}
    for u in batch:
        try:
            targets[id(u)] = [n for n in choose_remotes(root, pm, u.record.oid, u.record.size, cands) if n in by_name]
        except Skip as exc:
            u.failed = str(exc)
        except JamError as exc:
            u.failed = describe(exc)
    holds: dict[int, set[str]] = {id(u): set() for u in batch}
    newly: dict[str, int] = {}
    for remote in remotes:
        items = [u for u in batch if not u.failed and remote.name in targets.get(id(u), ())]
        if not items:
            continue
        try:
            ensure_identity(root, remote, pm, session)
            recorder.before_store(remote, {u.record.oid for u in items})
            lacking = []
            for u in items:
                if pm.hook.has(remote=remote, oid=u.record.oid, size=u.record.size, session=session):
                    holds[id(u)].add(remote.name)
                else:
                    lacking.append(u)
            results = list(store_on(remote, lacking, pm, session)) if lacking else []
            if results:
                pm.hook.sync(remote=remote, session=session)
            going = recorder.removing_elsewhere(remote)
        except (JamError, OSError) as exc:
            for u in items:
                u.failed = u.failed or f"remote {remote.name!r}: {describe(exc)}"
            if isinstance(exc, RemoteError):
                out.problems.append(f"remote {remote.name!r}: {describe(exc)}")
            continue
        for u, err in results:
            if err is None:
                holds[id(u)].add(remote.name)
                newly[u.record.oid] = u.record.size
            else:
                u.failed = u.failed or describe(err)
        for u in items:
            if u.record.oid in going:
                holds[id(u)].discard(remote.name)
                u.failed = u.failed or f"another root is removing it from {remote.name!r} at this moment"
    pairs = []
    for u in batch:
        if u.failed:
            continue
        missing = [n for n in targets[id(u)] if n not in holds[id(u)]]
        if missing:
            u.failed = f"not stored on {', '.join(repr(n) for n in missing)}"
            continue
        pairs += [(u.record.oid, n) for n in holds[id(u)]]
        known.add(u.record.oid)
    ix.record_stored(pairs)
    ok = {u.record.oid for u in batch if not u.failed}
    out.uploaded += sum(1 for o in newly if o in ok)
    out.bytes += sum(s for o, s in newly.items() if o in ok)


# -- reading snapshots back ---------------------------------------------------------------------
class SnapshotAbsent(RemoteError):
    """Every remote asked answered that it does not hold the snapshot (none failed)."""


def fetch_snapshot(root_tmp: Path, remotes: list[Remote], sid: str, size: int, pm,
                   session: Session) -> tuple[bytes, Snapshot]:
    """The stored bytes of snapshot ``sid`` and the snapshot from the first of ``remotes`` that has it, verified
    against its id and validated (``parse``). SnapshotError / RemoteError with one line."""
    if not 0 < size <= (256 << 20):
        raise SnapshotError(f"snapshot {sid[:19]}: impossible size {size}; refused")
    errors = []
    refused: SnapshotError | None = None
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
            try:
                if os.fstat(fd).st_size != size:
                    raise SnapshotError(f"snapshot {sid[:19]} on remote {remote.name!r}: not {size} bytes; refused")
                data = os.pread(fd, size + 1, 0)
                return data, parse(data, expect=sid)  # verified and validated, or refused
            except SnapshotError as exc:  # a copy damaged (or hostile) there: the next remote's may be whole
                refused = refused or exc
                errors.append(f"{remote.name}: {describe(exc)}")
        finally:
            os.close(fd)
    if refused is not None:
        raise refused
    if errors and all(e.endswith(": not there") for e in errors):
        raise SnapshotAbsent(f"snapshot {sid[:19]}: no remote has it ({'; '.join(errors)[:300]})")
    raise RemoteError(f"snapshot {sid[:19]}: no remote has it ({'; '.join(errors)[:300]})")


def still_in(root_fd: int, rel: str, dfd: int) -> bool:
    """Whether ``dfd`` is still the directory of the entry ``rel`` (``fs.same_dir``): asked
    right before an entry is renamed in through it."""
    return same_dir(root_fd, rel.rpartition("/")[0], dfd)


# -- push --------------------------------------------------------------------------------------
def write_head(remote: Remote, name: str, sid: str, size: int, pm, session: Session) -> None:
    """Replace this machine's head on ``remote`` (write_meta: atomic)."""
    done = pm.hook.write_meta(remote=remote, name=name, data=encode_head(sid, size), session=session)
    if done is None:
        raise RemoteError(f"remote {remote.name!r}: its backend cannot write jam's metadata (no write_meta)")


def push(root: Root, pm, session: Session, ix: Index, recorder, remotes: list[Remote], tree: str, machine: str,
         out: CommitResult) -> None:
    """Store on each remote every kept snapshot it lacks (oldest first, refs recorded before),
    then write this machine's head there. A remote that fails is one problem line; the next
    commit tries again."""
    from jam_core.history.snapshot import id_of
    from jam_core.ops.remotes import ensure_identity

    head = ix.head()
    if head is None:
        return
    kept = list(reversed(ix.snapshot_ids()))  # oldest first
    needed: dict[str, tuple[int, str]] | None = None
    for remote in head_remotes(remotes):
        todo = [s for s in kept if s not in ix.pushed_to(remote.name)]
        written = ix.db.execute("SELECT value FROM meta WHERE key = ?", (f"head:{remote.name}",)).fetchone()
        if not todo and written is not None and written[0] == head:
            continue
        try:
            ensure_identity(root, remote, pm, session)
            if todo:
                recorder.before_store(remote, todo)
                for sid in todo:
                    data = ix.bytes_of(sid)
                    if data is None or id_of(data) != sid:
                        raise JamError(f"snapshot {sid[:19]}: its cached bytes are missing or corrupt "
                                       f"({ix.cache_path(sid)}); not sent")
                    fd = os.open(ix.cache_path(sid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                    try:
                        ok = pm.hook.stash(remote=remote, oid=sid, source=Path(fd_path(fd)), size=len(data),
                                           session=session)
                    finally:
                        os.close(fd)
                    if ok is not True:
                        raise RemoteError(f"remote {remote.name!r} did not store snapshot {sid[:19]}")
                pm.hook.sync(remote=remote, session=session)
                going = recorder.removing_elsewhere(remote)
                for sid in todo:
                    if sid not in going:
                        ix.record_pushed(sid, remote.name)
                if head in going:
                    raise RemoteError(f"another root is removing snapshot {head[:19]} from it at this moment")
            size = ix.size_of(head)
            if not size:
                raise JamError(f"snapshot {head[:19]}: its cached bytes are missing ({ix.cache_path(head)})")
            if needed is None:
                needed = {i.oid: (i.size, i.path) for i in ix.load(head).items if i.kind == FILE and i.size}
            lacking = complete(root, pm, session, ix, recorder, remote, needed)
            if lacking:
                path, why = lacking[0]
                out.problems.append(
                    f"remote {remote.name!r}: head not written: it lacks {len(lacking)} "
                    f"object{'s' if len(lacking) > 1 else ''} of snapshot {head[:19]} that could not be copied "
                    f"there (e.g. {path}: {why})"[:600])
                continue
            stranger = _strange_head(remote, ix, tree, machine, head, pm, session)
            if stranger:
                out.problems.append(f"remote {remote.name!r}: head not written: {stranger}")
                continue
            write_head(remote, head_name(tree, machine), head, size, pm, session)
            ix.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"head:{remote.name}", head))
            registered = ix.db.execute("SELECT value FROM meta WHERE key = ?", (f"tree:{remote.name}",)).fetchone()
            if registered is None or registered[0] != tree:
                register_tree(remote, tree, pm, session)
                ix.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"tree:{remote.name}", tree))
        except (JamError, OSError) as exc:
            out.problems.append(f"remote {remote.name!r}: snapshot not sent ({describe(exc)}); "
                                "it is recorded here and the next `jam commit` sends it")


def known_here(ix: Index, sid: str) -> bool:
    """Whether this root made or saw snapshot ``sid`` (in its history, or the head it last
    wrote on a remote, even if ``gc --keep`` forgot it since)."""
    if ix.db.execute("SELECT 1 FROM snapshots WHERE id = ?", (sid,)).fetchone() is not None:
        return True
    return ix.db.execute("SELECT 1 FROM meta WHERE key LIKE 'head:%' AND value = ?", (sid,)).fetchone() is not None


def shared_id_problem(machine: str, tree: str, sid: str) -> str:
    return (f"this machine's head of tree {tree!r} there (machine id {machine}) names snapshot {sid[:19]}, which "
            "this root never made nor saw: another root writes it (another computer with this machine id: give "
            "one of them its own with JAM_MACHINE_ID, or remove jam's machine-id file there; or another root of "
            "this computer whose directory has this name: set `name` under [history] in .jam/config.toml)")


def _strange_head(remote: Remote, ix: Index, tree: str, machine: str, head: str, pm, session: Session) -> str:
    """Why this machine's head of ``tree`` on ``remote`` must not be replaced ("" if it may):
    it names a snapshot this root never made nor saw, so another root writes it (two roots
    of one machine with one tree name, or two computers with one machine id). Replacing it
    would take that root's tree away from every other computer (and it would take ours)."""
    data = pm.hook.read_meta(remote=remote, name=head_name(tree, machine), session=session)
    prev = decode_head(bytes(data)) if data else None
    if prev is None or prev[0] == head or known_here(ix, prev[0]):
        return ""
    return shared_id_problem(machine, tree, prev[0])


def register_tree(remote: Remote, tree: str, pm, session: Session) -> None:
    """Write ``meta/history-trees/<tree>`` (so a backend that lists files only, sftp, can list
    the trees a remote holds for ``jam clone``). Every push does, once per remote and tree."""
    if pm.hook.read_meta(remote=remote, name=f"{REGISTRY}/{tree}", session=session):
        return
    pm.hook.write_meta(remote=remote, name=f"{REGISTRY}/{tree}", data=b"jam-tree 1\n", session=session)


def head_remotes(remotes: list[Remote]) -> list[Remote]:
    """The remotes that receive this root's snapshots and heads: every durable remote except
    the embedded local default (``jam init``'s, under this user's data directory) when the root
    has another one. That default is this computer's own disk: no other computer clones from
    it, and a head there would make it hold every object the tree needs (every other machine's
    files copied onto this disk)."""
    from jam_core.root import DEFAULT_REMOTE, default_remote_location

    if len(remotes) < 2:
        return list(remotes)
    here = os.path.realpath(default_remote_location())
    return [r for r in remotes
            if not (r.name == DEFAULT_REMOTE and r.kind == "dir" and os.path.realpath(r.location) == here)]


def complete(root: Root, pm, session: Session, ix: Index, recorder, remote: Remote,
             needed: dict[str, tuple[int, str]]) -> list[tuple[str, str]]:
    """Make ``remote`` hold every object of ``needed`` ({oid: (size, a path)}: what a head
    written there promises a clone). What the index knows is there is taken as there; the rest
    is asked live (one listing when there are many, else ``has`` each); what is still missing
    is copied from the other remotes (``ops.copies.copy_objects``: verified, refs first,
    durable). Returns (path, why) for each object that could not be put there."""
    from jam_core.ops.copies import copy_objects

    there = ix.stored_by(remote.name)
    unknown = {o: v for o, v in needed.items() if o not in there}
    if not unknown:
        return []
    listing = pm.hook.list_objects(remote=remote, session=session, sweep=False) if len(unknown) > 64 else None
    listed = None
    if listing is not None:
        listed = dict(listing)
        present = {o for o, v in unknown.items() if listed.get(o) == v[0]}
    else:
        present = {o for o, (n, _p) in unknown.items()
                   if pm.hook.has(remote=remote, oid=o, size=n, session=session) is True}
    ix.record_stored((o, remote.name) for o in present)
    missing = {o: v[0] for o, v in unknown.items() if o not in present}
    if not missing:
        return []
    from jam_core.history import chunks  # an object stored as content-defined chunks: its recipe and chunks

    others = [r for r in durable_remotes(root) if r.name != remote.name]
    for o in chunks.complete(root, pm, session, ix, remote, missing, others, listed):
        del missing[o]
    if not missing:
        return []
    copied, failed = copy_objects(root, pm, session, remote, missing, holders=ix.stored_on, recorder=recorder)
    ix.record_stored((o, remote.name) for o in copied)
    return sorted((needed[o][1], why) for o, why in failed.items())


def absent(remotes: list[Remote], needed: dict[str, int], pm, session: Session) -> set[str]:
    """The objects of ``needed`` ({oid: size}) that none of ``remotes`` holds now, asked live
    (never what the index remembers: another root's removal may have run since): one listing
    per remote when there are many, else ``has`` each; an object stored as chunks is held if
    its recipe and every chunk are there. For sync and clone, after their refs were recorded
    and before any stub is made: a stub of an object no remote holds could never come back.
    RemoteError/JamError if a remote cannot be asked (the caller then makes nothing)."""
    from jam_core.history import chunks

    missing = dict(needed)
    for remote in remotes:
        if not missing:
            break
        listing = pm.hook.list_objects(remote=remote, session=session, sweep=False) if len(missing) > 64 else None
        if listing is not None:
            listed = dict(listing)
            present = {o for o, n in missing.items() if listed.get(o) == n}
        else:
            listed = None
            present = {o for o, n in missing.items()
                       if pm.hook.has(remote=remote, oid=o, size=n, session=session) is True}
        for o in present:
            del missing[o]
        for o, n in list(missing.items()):
            if chunks.held(remote, o, n, pm, session, listed):
                del missing[o]
    return set(missing)


def read_heads(remote: Remote, tree: str, pm, session: Session) -> dict[str, tuple[str, int]]:
    """Every machine's head of ``tree`` on ``remote``: {machine id: (snapshot id, size)} (for
    sync and clone; invalid heads are left out)."""
    names = pm.hook.list_meta(remote=remote, prefix=f"{HEADS}/{tree}", session=session) or []
    out = {}
    for name in names:
        data = pm.hook.read_meta(remote=remote, name=name, session=session)
        sid = decode_head(bytes(data)) if data else None
        if sid:
            out[name.rpartition("/")[2]] = sid
    return out


def _refill(root: Root, tmp_dir: Path, sid: str, size: int) -> bytes:
    """``Index.read_bytes``'s way back for a snapshot its cache lost: fetched from the root's
    remotes (verified against its id, validated)."""
    from jam_core.manager import make_plugin_manager

    with Session() as session:
        data, _snap = fetch_snapshot(tmp_dir, durable_remotes(root), sid, size, make_plugin_manager(), session)
    return data


index_module.REFILL = _refill

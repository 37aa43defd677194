"""ROOT/.jam/history/: what this root knows of its versions, kept beside the catalog.

* ``history.db`` (SQLite): ``ids`` (content ids of local files by (dev, ino) with size,
  mtime_ns and ctime_ns, so an unchanged file is not hashed again), ``snapshots`` (the
  snapshots this root keeps, with the counts ``jam log`` shows), ``objects`` (the union of
  every kept snapshot's objects and the snapshots' own ids: what ``ops.refs.referenced``
  publishes, so no root removes them), ``stored`` (objects known to be on a remote), ``pushed``
  (snapshots known to be on a remote), ``meta`` (``head``: the newest snapshot), ``recipes`` and
  ``chunks`` (the recipe of each object stored as content-defined chunks, ``chunks.py``, and the
  chunks each recipe lists: the kept union counts the recipe and chunks of every kept object).
* ``objects/<hex>``: the bytes of each kept snapshot, verified against their id on every read.
* ``HEAD``: the id of the newest snapshot (a readable mirror of the db's head).

The caller holds the root's lock for every write.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from jam_core.errors import JamError
from jam_core.history.snapshot import Snapshot, SnapshotError, parse
from jam_core.objects import is_valid_oid
from jam_core.root import Root

DIR = "history"
DB = "history.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ids (dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
                                oid TEXT NOT NULL, mode INTEGER NOT NULL, PRIMARY KEY (dev, ino));
CREATE TABLE IF NOT EXISTS snapshots (id TEXT PRIMARY KEY, time_ns INTEGER NOT NULL, machine TEXT, host TEXT,
                                      message TEXT, files INTEGER, added INTEGER, modified INTEGER,
                                      deleted INTEGER, bytes INTEGER);
CREATE TABLE IF NOT EXISTS objects (oid TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stored (oid TEXT, remote TEXT, PRIMARY KEY (oid, remote)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pushed (id TEXT, remote TEXT, PRIMARY KEY (id, remote)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS recipes (whole TEXT PRIMARY KEY, size INTEGER NOT NULL, recipe TEXT NOT NULL,
                                    stored INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (recipe TEXT, cid TEXT, size INTEGER NOT NULL, PRIMARY KEY (recipe, cid))
    WITHOUT ROWID;
"""


MAX_CACHED = 256 << 20  # a snapshot's stored bytes at most (as fetch_snapshot refuses more)
MEMO = 64 << 20  # snapshots' bytes an Index remembers (bytes_of)
REFILL = None  # (root, tmp dir, sid, size) -> stored bytes from the remotes: set by history.store


class HistoryError(JamError):
    exit_code = 1


def history_dir(root: Root) -> Path:
    return root.jam_dir / DIR


def exists(root: Root) -> bool:
    """Whether this root has a history: its db, or a ``HEAD`` (a db lost while ``HEAD`` stays is
    a history whose records are missing, refused by ``Index``: never taken for none)."""
    d = history_dir(root)
    return (d / DB).is_file() or os.path.lexists(d / "HEAD")


class Index:
    """The history db of one root. ``with Index(root) as ix: ...``"""

    def __init__(self, root: Root, create: bool = True):
        self.root = root
        self.dir = history_dir(root)
        self._memo: dict[str, bytes] = {}  # sid -> stored bytes read (bytes_of)
        if create:
            (self.dir / "objects").mkdir(parents=True, exist_ok=True)
        from jam_core.catalog import not_regular

        odd = not_regular(self.dir / DB)
        if odd is not None:
            raise HistoryError(f"{odd} is not a regular file (a symlink?); jam will not open it: move it away")
        try:
            self.db = sqlite3.connect(self.dir / DB, timeout=30, isolation_level=None)
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open {self.dir / DB}: {exc}; jam keeps every object meanwhile") from None
        try:
            self._check_records()
        except BaseException:
            self.db.close()
            raise

    def _check_records(self) -> None:
        """``HEAD`` is written only after the db recorded that head, so a db with no head
        beside a ``HEAD`` lost its records (deleted, emptied, an empty file put back): refused.
        Taken for "no history", a gc would remove every object only older versions need and a
        commit would start a new history over this machine's head on the remotes."""
        try:
            if self.db.execute("SELECT 1 FROM meta WHERE key = 'head'").fetchone() is not None:
                return
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot read {self.dir / DB}: {exc}; jam keeps every object meanwhile") from None
        if os.path.lexists(self.dir / "HEAD"):
            raise HistoryError(f"{self.dir / DB} has lost the history's records ({self.dir / 'HEAD'} names a "
                               "snapshot it does not know: deleted, emptied or damaged); nothing done: put it back "
                               "from a backup (jam keeps every object meanwhile)")

    def close(self) -> None:
        self.db.close()

    def tidy(self) -> None:
        """Remove the temporary files of a killed commit (``.NAME.PID.tmp``). Only a commit,
        under the root's lock, writes them: the caller holds it."""
        for d in (self.dir, self.dir / "objects"):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    try:
                        os.unlink(d / name)
                    except OSError:
                        pass

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ids cache ------------------------------------------------------------------------
    def ids(self) -> dict[tuple[int, int], tuple[int, int, int, str, int]]:
        """{(dev, ino): (size, mtime_ns, ctime_ns, oid, mode)}: what a file (local or stub)
        was when it was last looked at; ctime moves on any write, chmod or xattr change."""
        return {(d, i): (s, m, c, o, md) for d, i, s, m, c, o, md in
                self.db.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, oid, mode FROM ids")}

    def remember_ids(self, rows) -> None:
        """Rows of (dev, ino, size, mtime_ns, ctime_ns, oid, mode)."""
        rows = list(rows)
        if rows:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")

    # -- where objects are --------------------------------------------------------------
    def stored_on(self, oid: str) -> set[str]:
        return {r for (r,) in self.db.execute("SELECT remote FROM stored WHERE oid = ?", (oid,))}

    def stored_by(self, remote: str) -> set[str]:
        return {o for (o,) in self.db.execute("SELECT oid FROM stored WHERE remote = ?", (remote,))}

    def all_stored(self) -> set[str]:
        return {o for (o,) in self.db.execute("SELECT DISTINCT oid FROM stored")}

    def record_stored(self, pairs) -> None:
        pairs = list(pairs)
        if pairs:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO stored VALUES (?, ?)", pairs)
            self.db.execute("COMMIT")

    def forget_stored(self, pairs) -> None:
        """Objects no longer on a remote (removed through ``ops.copies.remove_copies``): a
        later commit must upload such content again, not take it for stored."""
        pairs = list(pairs)
        if pairs:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM stored WHERE oid = ? AND remote = ?", pairs)
            self.db.execute("COMMIT")

    def only_on(self, remote: str) -> int:
        """How many objects the kept snapshots need (snapshots included) are known to be on
        ``remote`` and on no other remote (for ``jam remote remove``)."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM objects o WHERE "
            "(EXISTS (SELECT 1 FROM stored s WHERE s.oid = o.oid AND s.remote = ?1) "
            " AND NOT EXISTS (SELECT 1 FROM stored s WHERE s.oid = o.oid AND s.remote != ?1)) OR "
            "(EXISTS (SELECT 1 FROM pushed p WHERE p.id = o.oid AND p.remote = ?1) "
            " AND NOT EXISTS (SELECT 1 FROM pushed p WHERE p.id = o.oid AND p.remote != ?1))", (remote,)).fetchone()
        return int(row[0])

    def pushed_to(self, remote: str) -> set[str]:
        return {s for (s,) in self.db.execute("SELECT id FROM pushed WHERE remote = ?", (remote,))}

    def pushed_on(self, sid: str) -> set[str]:
        return {r for (r,) in self.db.execute("SELECT remote FROM pushed WHERE id = ?", (sid,))}

    def record_pushed(self, sid: str, remote: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO pushed VALUES (?, ?)", (sid, remote))

    # -- snapshots -------------------------------------------------------------------------
    def head(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
        if row is None:
            return None
        if not is_valid_oid(row[0]):
            raise HistoryError(f"{self.dir / DB}: its head is malformed; jam keeps every object meanwhile")
        return row[0]

    def rows(self) -> list[tuple]:
        """(id, time_ns, machine, host, message, files, added, modified, deleted, bytes),
        newest first."""
        return list(self.db.execute("SELECT id, time_ns, machine, host, message, files, added, modified, deleted, "
                                    "bytes FROM snapshots ORDER BY time_ns DESC, id DESC"))

    def snapshot_ids(self) -> list[str]:
        return [r[0] for r in self.rows()]

    def cache_path(self, sid: str) -> Path:
        if not is_valid_oid(sid):
            raise HistoryError(f"not a snapshot id: {sid[:80]!r}")
        return self.dir / "objects" / sid.replace(":", "-")

    def read_bytes(self, sid: str) -> bytes | None:
        """The cached stored bytes of ``sid``, or None if not cached here (not yet verified). A
        snapshot this history records whose cached bytes are gone (the cache emptied) is
        fetched again from the root's remotes (verified against its id by ``parse`` on load)."""
        data = self._cached(sid)
        if data is None and self._stored_size(sid):
            data = self._refill(sid)
        return data

    def bytes_of(self, sid: str, keep: bool = True) -> bytes | None:
        """``read_bytes``, remembered for this Index's life (a snapshot's bytes never change:
        its id is their hash), up to MEMO bytes in all; ``keep=False``: a walk's read, taken
        from the memo if there but not added to it."""
        data = self._memo.get(sid)
        if data is not None:
            return data
        data = self.read_bytes(sid)
        if data is not None and keep and len(data) <= MEMO:
            while self._memo and sum(map(len, self._memo.values())) + len(data) > MEMO:
                self._memo.pop(next(iter(self._memo)))
            self._memo[sid] = data
        return data

    def size_of(self, sid: str) -> int:
        """The stored size of snapshot ``sid`` (recorded when it was added; else read)."""
        return self._stored_size(sid) or len(self.bytes_of(sid) or b"")

    def _stored_size(self, sid: str) -> int:
        """The stored size of a snapshot this history records (0: unknown)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"size:{sid}",)).fetchone()
        try:
            n = int(row[0]) if row is not None else 0
        except (TypeError, ValueError):
            return 0
        if not 0 < n <= MAX_CACHED:
            return 0
        if self.db.execute("SELECT 1 FROM snapshots WHERE id = ?", (sid,)).fetchone() is None:
            return 0
        return n

    def _refill(self, sid: str) -> bytes | None:
        """Fetch ``sid`` again from the root's remotes into the cache (``REFILL``, which
        ``history.store`` provides: verified against its id); None if none gives it back."""
        from jam_core.history.snapshot import id_of

        if REFILL is None:
            return None
        try:
            data = REFILL(self.root, self.dir / "objects", sid, self._stored_size(sid))
            if id_of(data) != sid:  # (verified there already; never cached otherwise)
                return None
            self.save_bytes(sid, data)
        except (JamError, OSError):
            return None
        return data

    def _cached(self, sid: str) -> bytes | None:
        """The cached stored bytes of ``sid``, or None if not cached here (not yet verified).
        Only a regular file is read (opened without following a symlink, without waiting on a
        FIFO), at most MAX_CACHED bytes: anything else there is a one-line HistoryError."""
        path = self.cache_path(sid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HistoryError(f"{path}: {exc.strerror or exc} (not a snapshot jam cached; remove it)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # guard: a FIFO, a device, a socket is never read
                raise HistoryError(f"{path}: not a regular file (not a snapshot jam cached; remove it)")
            if st.st_size > MAX_CACHED:
                raise HistoryError(f"{path}: {st.st_size} bytes, too large for a snapshot; remove it")
            chunks, got = [], 0
            while True:
                b = os.read(fd, min(1 << 20, MAX_CACHED + 1 - got))
                if not b:
                    break
                chunks.append(b)
                got += len(b)
                if got > MAX_CACHED:
                    raise HistoryError(f"{path}: too large for a snapshot; remove it")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def load(self, sid: str) -> Snapshot:
        """The snapshot ``sid`` from the local cache, verified and validated."""
        data = self.bytes_of(sid)
        if data is None:
            raise HistoryError(f"snapshot {sid[:19]} is not in this root's cache ({self.dir / 'objects'}) "
                               "and no remote gave it back")
        return parse(data, expect=sid)

    def save_bytes(self, sid: str, stored: bytes) -> None:
        """Put stored bytes in the cache, durable, under their id (atomic)."""
        path = self.cache_path(sid)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(stored)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def add(self, snap: Snapshot, stored: bytes, counts: tuple[int, int, int], make_head: bool = True) -> None:
        """Record a new snapshot (cached first, then one transaction: its row, its objects in
        the kept union, the head), then mirror the head to ``HEAD``."""
        self.save_bytes(snap.id, stored)
        oids = snap.objects() | {snap.id}
        size = sum(i.size for i in snap.items)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (snap.id, snap.time_ns, snap.machine, snap.host, snap.message, len(snap.items),
                             *counts, size))
            self.db.executemany("INSERT OR IGNORE INTO objects VALUES (?)", ((o,) for o in oids))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"size:{snap.id}", str(len(stored))))
            if make_head:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('head', ?)", (snap.id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        if make_head:
            self.write_head_file(snap.id)

    def write_head_file(self, sid: str) -> None:
        tmp = self.dir / f".HEAD.{os.getpid()}.tmp"
        tmp.write_text(sid + "\n")
        os.replace(tmp, self.dir / "HEAD")

    def forget(self, sids: set[str]) -> None:
        """Forget snapshots: drop their rows and cached bytes, and recompute the kept union
        from the snapshots that remain (each read and verified: if one cannot be read,
        nothing is forgotten)."""
        head = self.head()
        if head in sids:
            raise HistoryError("the newest snapshot (HEAD) is always kept")
        keep = [s for s in self.snapshot_ids() if s not in sids]
        union = self.union_of(keep)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("DELETE FROM snapshots WHERE id = ?", ((s,) for s in sids))
            self.db.executemany("DELETE FROM pushed WHERE id = ?", ((s,) for s in sids))
            self.db.executemany("DELETE FROM meta WHERE key = ?", ((f"size:{s}",) for s in sids))
            self.db.execute("DELETE FROM objects")
            self.db.executemany("INSERT OR IGNORE INTO objects VALUES (?)", ((o,) for o in union))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        for s in sids:
            try:
                self.cache_path(s).unlink()
            except FileNotFoundError:
                pass

    def union_of(self, sids) -> set[str]:
        out: set[str] = set()
        for s in sids:
            try:
                out |= self.load(s).objects()
            except (SnapshotError, HistoryError, OSError) as exc:
                raise HistoryError(f"cannot read snapshot {s[:19]} ({exc}); nothing forgotten") from None
            out.add(s)
        return out | self.pieces_of(out)

    def kept_objects(self) -> set[str]:
        """The kept union, with the recipe and chunks of every object in it that was chunked."""
        oids = {o for (o,) in self.db.execute("SELECT oid FROM objects")}
        oids |= {o for (o,) in self.db.execute(
            "SELECT r.recipe FROM recipes r JOIN objects o ON o.oid = r.whole UNION "
            "SELECT c.cid FROM chunks c JOIN recipes r ON c.recipe = r.recipe JOIN objects o ON o.oid = r.whole")}
        return oids

    # -- content-defined chunks (chunks.py) ------------------------------------------------
    def record_recipe(self, whole: str, size: int, recipe: str, stored: int, chunks) -> None:
        """Remember that ``whole`` is stored as the recipe ``recipe`` (``stored`` bytes) listing
        ``chunks`` ((id, length))."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("INSERT OR REPLACE INTO recipes VALUES (?, ?, ?, ?)", (whole, size, recipe, stored))
            self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?)",
                                ((recipe, cid, n) for cid, n in chunks))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def recipe_of(self, whole: str) -> tuple[str, int, dict[str, int]] | None:
        """(recipe id, its stored size, {chunk id: length}) of a chunked object, or None."""
        row = self.db.execute("SELECT recipe, stored FROM recipes WHERE whole = ?", (whole,)).fetchone()
        if row is None:
            return None
        return row[0], row[1], {c: n for c, n in self.db.execute("SELECT cid, size FROM chunks WHERE recipe = ?",
                                                                   (row[0],))}

    def pieces_of(self, oids) -> set[str]:
        """The recipes and chunks of those of ``oids`` that were chunked."""
        out: set[str] = set()
        for whole, recipe in list(self.db.execute("SELECT whole, recipe FROM recipes")):
            if whole in oids:
                out.add(recipe)
                out |= {c for (c,) in self.db.execute("SELECT cid FROM chunks WHERE recipe = ?", (recipe,))}
        return out


def kept_objects(root: Root, without: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Every object the snapshots this root keeps need, and the snapshots themselves
    (``without``: as if those snapshots were forgotten). Empty for a root with no history.
    HistoryError if the history cannot be read: never taken for "nothing"."""
    if not exists(root):
        return set()
    try:
        with Index(root, create=False) as ix:
            if without:
                return ix.union_of(s for s in ix.snapshot_ids() if s not in without)
            return ix.kept_objects()
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read {history_dir(root) / DB}: {exc}; jam removes nothing") from None

"""The catalog: an SQLite index of a root's stubs, the objects on each remote, uses and pins.

It is an index, not the truth: the stubs' own metadata is. ``rebuild`` recreates the stub
table from a scan, so a ``mv`` of a stub, or a lost catalog, costs nothing but a scan.
Paths are stored as bytes relative to the root (names need not be UTF-8).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from jam_core.errors import JamError

BUSY_TIMEOUT = 10.0  # seconds to wait for another jam's write before saying the catalog is locked
LOW_SPACE = 1 << 20  # less free space than this on the catalog's disk: an I/O error is a full disk

SCHEMA = """
CREATE TABLE IF NOT EXISTS stubs (
    path BLOB PRIMARY KEY,
    oid TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    stashed_at TEXT NOT NULL,
    ino INTEGER,
    ctime_ns INTEGER
);
CREATE INDEX IF NOT EXISTS stubs_oid ON stubs(oid);
CREATE TABLE IF NOT EXISTS locations (
    oid TEXT NOT NULL,
    remote TEXT NOT NULL,
    size INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (oid, remote)
);
CREATE TABLE IF NOT EXISTS uses (
    path BLOB PRIMARY KEY,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    path BLOB PRIMARY KEY
);
"""


VERIFIED = """CREATE TABLE IF NOT EXISTS verified (
    oid TEXT NOT NULL,
    remote TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (oid, remote)
)"""


def _b(path: str) -> bytes:
    return os.fsencode(path)


def _s(path: bytes) -> str:
    return os.fsdecode(path)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # (what _s does)


# Rows jam wrote have a path that is bytes (``_b``); SQLite keeps any type in a BLOB column, and
# the catalog is input (invariant 7): a row whose path is anything else (an integer, text, NULL:
# damage, another tool) names no file, so the readers leave it out (``odd_stub_paths`` lists it
# for doctor, ``forget_odd_stubs`` drops it).
_NAMED = "typeof(path) = 'blob'"


class CatalogError(JamError, sqlite3.Error):
    """A catalog that cannot be used, said in one line. Also an ``sqlite3.Error``, so code
    that already falls back on those (a damaged catalog is only a cache) keeps doing so."""


class CatalogDamaged(CatalogError):
    """The catalog file is not a readable SQLite database (``jam doctor --fix`` rebuilds it)."""


def _translate(exc: sqlite3.Error, path) -> CatalogError:
    """One line saying what to do instead of an sqlite3 traceback."""
    text = str(exc)
    low = text.lower()
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == 13 or "disk is full" in low:  # SQLITE_FULL
        return _full(path)
    if primary in (5, 6) or "locked" in low or "busy" in low:  # SQLITE_BUSY, SQLITE_LOCKED
        return CatalogError(f"the catalog {path} is locked by another jam process (waited {BUSY_TIMEOUT:g} s): "
                        "let it finish, then run the command again")
    if primary in (11, 26) or "not a database" in low or "malformed" in low:  # CORRUPT, NOTADB
        return CatalogDamaged(f"the catalog {path} is damaged: run `jam doctor --fix` to rebuild it from the tree")
    if _low_space(path):  # an I/O error or a file that cannot be made, on a full disk
        return _full(path)
    if primary == 8 or "readonly" in low:  # SQLITE_READONLY
        return CatalogError(f"the catalog {path} cannot be written ({text}): check the permissions of its directory")
    return CatalogError(f"the catalog {path} cannot be read or written ({text}): check the disk, "
                    "then run `jam doctor --fix` to rebuild it from the tree")


def not_regular(db_path) -> str | None:
    """The first of an SQLite database's files (the db, its -wal, -shm and -journal) that is
    there and not a regular file (a symlink planted in .jam), or None. SQLite opens them by
    name, following symlinks: opened, jam would write into whatever such a link points at."""
    import stat

    for suffix in ("", "-wal", "-shm", "-journal"):
        p = f"{db_path}{suffix}"
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        except OSError:
            return p
        if not stat.S_ISREG(st.st_mode):
            return p
    return None


def _missing(db_path) -> bool:
    """The catalog is gone but the root had stubs (its cd index, ``.jam/stubdirs``, exists): a
    catalog made empty here would be taken for the truth (the index rebuilt from it would
    forget every directory of stubs), so only doctor --fix makes it again, from the tree."""
    return not os.path.lexists(db_path) and os.path.isdir(os.path.join(os.path.dirname(db_path), "stubdirs"))


def _full(path) -> CatalogError:
    return CatalogError(f"no space left on the local disk for the catalog ({path}): free some space "
                    "and run the command again")


def _low_space(path) -> bool:
    try:
        v = os.statvfs(os.path.dirname(os.fspath(path)) or ".")
    except OSError:
        return False
    return v.f_bavail * v.f_frsize < LOW_SPACE or v.f_favail == 0


class _Rows:
    """A finished query: its rows are already fetched (a damaged page raises where it is caught)."""

    def __init__(self, rows: list, rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self):
        return iter(self._rows)

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list:
        return list(self._rows)


class _Db:
    """The sqlite3 connection, with every error turned into a one-line JamError."""

    def __init__(self, conn: sqlite3.Connection, path):
        self.conn = conn
        self.path = path

    def _run(self, fn, *args) -> _Rows:
        try:
            cur = fn(*args)
            return _Rows(cur.fetchall(), cur.rowcount)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def execute(self, sql: str, params=()) -> _Rows:
        return self._run(self.conn.execute, sql, params)

    def stream(self, sql: str, params=(), size: int = 4096) -> Iterator[tuple]:
        """The rows of a query as they are read, ``size`` at a time (a million rows never held
        at once as a list), errors turned into one-line JamErrors as by ``execute``."""
        try:
            cur = self.conn.execute(sql, params)
            while rows := cur.fetchmany(size):
                yield from rows
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def executemany(self, sql: str, rows) -> _Rows:
        return self._run(self.conn.executemany, sql, rows)

    def executescript(self, sql: str) -> _Rows:
        return self._run(self.conn.executescript, sql)

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None


_STUB_COLS = "(path, oid, size, mtime_ns, stashed_at, ino, ctime_ns)"


class Catalog:
    """The index of one root. Every sqlite3 error (a damaged file, another jam holding a write
    lock past ``BUSY_TIMEOUT``, a full disk) is raised as a one-line JamError saying what to
    do; a damaged file as :class:`CatalogDamaged`."""

    def __init__(self, db_path: Path, rebuild: bool = False):
        """``rebuild`` (doctor --fix, which fills it from the tree): a missing catalog of a root
        that had stubs may be made anew; any other command refuses it (see ``_missing``)."""
        self.path = db_path
        odd = not_regular(db_path)
        if odd is not None:
            raise CatalogDamaged(f"the catalog file {odd} is not a regular file (a symlink?); jam will not open "
                                 "it: run `jam doctor --fix` to move it aside and rebuild the catalog from the tree")
        if not rebuild and _missing(db_path):
            raise CatalogDamaged(f"the catalog {db_path} is missing, and this root had stubs: run `jam doctor "
                                 "--fix` to rebuild it from the tree")
        try:
            conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except sqlite3.Error as exc:
            raise _translate(exc, db_path) from None
        self.db = _Db(conn, db_path)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._migrate()
        except BaseException:
            conn.close()
            raise

    def _migrate(self) -> None:
        """Catalogs made by an older jam gain the columns and tables this one reads."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(stubs)")}
        for col in ("ino", "ctime_ns"):
            if col not in have:
                self.db.execute(f"ALTER TABLE stubs ADD COLUMN {col} INTEGER")
        self.db.execute(VERIFIED)  # doctor --deep's scrub records (added with issue 10)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self, keep_on_error: bool = False):
        """``with cat.transaction():`` one commit for many changes. ``keep_on_error`` commits
        what was written even if the block is interrupted (rows that record facts already on
        disk, such as files already swapped for stubs)."""
        return _Tx(self.db, keep_on_error)

    # -- stubs ----------------------------------------------------------------------------
    def add_stub(self, path: str, oid: str, size: int, mtime_ns: int, stashed_at: str, remotes: Iterable[str],
                 ino: int | None = None, ctime_ns: int | None = None) -> None:
        """Record a stub. ``ino`` and ``ctime_ns`` (from an lstat of the stub once it is in
        place) let a scan trust an untouched stub without reading it: any write, even one
        whose mtime was put back, changes the ctime."""
        self.db.execute(f"INSERT OR REPLACE INTO stubs {_STUB_COLS} VALUES (?,?,?,?,?,?,?)",
                        (_b(path), oid, size, mtime_ns, stashed_at, ino, ctime_ns))
        now = time.time()
        self.db.executemany("INSERT OR IGNORE INTO locations VALUES (?,?,?,?)",
                            [(oid, r, size, now) for r in remotes])

    def remove_stub(self, path: str) -> None:
        self.db.execute("DELETE FROM stubs WHERE path = ?", (_b(path),))

    def remove_stubs(self, paths: Iterable[str]) -> None:
        """Drop the rows of ``paths`` (files checked out, stubs gone) in one statement."""
        self.db.executemany("DELETE FROM stubs WHERE path = ?", [(_b(p),) for p in paths])

    def stubs(self) -> dict[str, tuple[str, int]]:
        rows = self.db.execute(f"SELECT path, oid, size FROM stubs WHERE {_NAMED}")
        return {_s(p): (oid, size) for p, oid, size in rows}

    def stub_stats(self, under: str = ".") -> dict[bytes, tuple[int, int]]:
        """``{path (bytes): (size, mtime_ns)}`` of the stubs at or under ``under``: what a scan
        needs to recognise an unchanged stub from its stat alone."""
        if under == ".":
            rows = self.db.execute(f"SELECT path, size, mtime_ns FROM stubs WHERE {_NAMED}")
        else:
            prefix = _b(under)
            rows = self.db.execute("SELECT path, size, mtime_ns FROM stubs WHERE path = ? OR "
                                   "(path >= ? AND path < ?)", (prefix, prefix + b"/", prefix + b"0"))
        return {p: (size, mtime) for p, size, mtime in rows}

    def stub_stamps(self, under: str = ".") -> dict[bytes, tuple[int, int, int | None, int | None]]:
        """``{path (bytes): (size, mtime_ns, ino, ctime_ns)}`` of the stubs at or under ``under``
        (ino and ctime None where unknown): a stub whose lstat matches all four was not
        touched since it was made, so a scan may trust it without reading it."""
        rows = self._stubs_under("path, size, mtime_ns, ino, ctime_ns", under)
        return {p: (size, mtime, ino, ctime) for p, size, mtime, ino, ctime in rows}

    def record_stamps(self, rows: Iterable[tuple[bytes, str, int, int, int, int]]) -> int:
        """Rows of ``(path (bytes), oid, size, mtime_ns, ino, ctime_ns)`` from a scan that read
        each stub and found it clean: the stamp (inode, ctime) is recorded on the catalog's row
        of that path only if the row names the same content (id, size, mtime). No row is
        added. Returns how many rows were updated."""
        rows = [(ino, ctime, path, oid, size, mtime) for path, oid, size, mtime, ino, ctime in rows]
        if not rows:
            return 0
        with self.transaction():
            cur = self.db.executemany("UPDATE stubs SET ino = ?, ctime_ns = ? WHERE path = ? AND oid = ? "
                                      "AND size = ? AND mtime_ns = ?", rows)
        return cur.rowcount

    def stub_rows(self, under: str = ".") -> dict[bytes, tuple]:
        """``{path (bytes): (oid, size, mtime_ns, stashed_at, ino, ctime_ns)}`` of the stubs at or
        under ``under``, in one query: what doctor needs of a stub the stamp vouches for
        (``stub_stamps`` is ``(size, mtime_ns, ino, ctime_ns)`` of the same rows). The values
        are as stored: validate them before use."""
        rows = self._stubs_under("path, oid, size, mtime_ns, stashed_at, ino, ctime_ns", under)
        return {r[0]: r[1:] for r in rows}

    def each_stub_row(self) -> Iterator[tuple]:
        """The rows of ``stub_rows`` (every stub), ``(path, oid, size, mtime_ns, stashed_at, ino,
        ctime_ns)``, one at a time as they are read: what holds a million of them in a form of
        its own needs no second copy while it builds it."""
        return self.db.stream(f"SELECT path, oid, size, mtime_ns, stashed_at, ino, ctime_ns FROM stubs WHERE {_NAMED}")

    def stamps_by_dir(self, under: str = ".", children: bool = False) -> dict[str, dict[str, tuple]]:
        """The stamps of ``stub_stamps`` by directory, as a walk meets them: ``{directory:
        {name: (size, mtime_ns, ino, ctime_ns)}}`` (str, surrogate-escaped as ``os.scandir``
        names them; the top is "."). ``children``: only the stubs directly in ``under``, none
        further below (a shared walk loads each directory it hands out as it enters it)."""
        out: dict[str, dict[str, tuple]] = {}
        decode, enc, err = bytes.decode, _FS_ENCODING, _FS_ERRORS
        for row in self._stubs_under("path, size, mtime_ns, ino, ctime_ns", under, children):
            d, _, name = decode(row[0], enc, err).rpartition("/")
            here = out.get(d or ".")
            if here is None:
                here = out[d or "."] = {}
            here[name] = row[1:]
        return out

    def stamps_of(self, names: list[str]) -> dict[str, tuple]:
        """``{name: (size, mtime_ns, ino, ctime_ns)}`` of the stubs named ``names`` at the top of
        the root (looked up by name, 500 at a time: the stubs directly in the root are found by
        no range of the primary key, and asking for every row without a "/" reads the whole
        table)."""
        rows = self._where_in("SELECT path, size, mtime_ns, ino, ctime_ns FROM stubs", "path", [_b(n) for n in names])
        return {_s(r[0]): r[1:] for r in rows}

    def _where_in(self, select: str, column: str, keys: list):
        """The rows of ``select`` whose ``column`` is one of ``keys``: one query per 500 keys
        (SQLite's limit on bound parameters)."""
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            yield from self.db.execute(f"{select} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)

    def _stubs_under(self, columns: str, under: str, children: bool = False):
        """Rows of the stubs table at or under ``under`` (a path relative to the root); with
        ``children``, only those directly in it (the test runs in SQLite: no row below is
        fetched)."""
        sql = f"SELECT {columns} FROM stubs"
        if under == ".":
            return self.db.execute(sql + f" WHERE {_NAMED}" + (" AND instr(path, x'2f') = 0" if children else ""))
        prefix = _b(under)  # (only blobs compare equal to, or between, two blobs)
        if children:
            return self.db.execute(sql + " WHERE path >= ? AND path < ? AND instr(substr(path, ?), x'2f') = 0",
                                   (prefix + b"/", prefix + b"0", len(prefix) + 2))
        return self.db.execute(sql + " WHERE path = ? OR (path >= ? AND path < ?)",
                               (prefix, prefix + b"/", prefix + b"0"))

    def known_paths(self, paths: list[str]) -> set[str]:
        """Which of ``paths`` have a stub row (one query per 500)."""
        return {_s(p) for (p,) in self._where_in("SELECT path FROM stubs", "path", [_b(p) for p in paths])}

    def has_stub_within(self, d: str, depth: int | None) -> bool:
        """Whether a stub row lies in the directory ``d`` ("" = the root) or up to ``depth``
        levels below it (one range query on the path index, stopped at the first)."""
        prefix = _b(d) + b"/" if d else b""
        where = f"{_NAMED} AND path >= ?"
        args: list = [prefix]
        if d:
            where += " AND path < ?"
            args.append(_b(d) + b"0")  # '0' follows '/'
        if depth is not None:  # no more than depth slashes after the prefix
            rest = "CAST(substr(path, ?) AS TEXT)"  # bytes counted as bytes: a name need not be UTF-8
            where += f" AND length(CAST({rest} AS BLOB)) - length(CAST(replace({rest}, '/', '') AS BLOB)) <= ?"
            args += [len(prefix) + 1, len(prefix) + 1, depth]
        return self.db.execute(f"SELECT 1 FROM stubs WHERE {where} LIMIT 1", args).fetchone() is not None

    def odd_stub_paths(self) -> list:
        """The paths, as stored, of the stub rows the readers leave out (``_NAMED``): for doctor
        to report."""
        return [p for (p,) in self.db.execute(f"SELECT path FROM stubs WHERE NOT {_NAMED}")]

    def forget_odd_stubs(self) -> int:
        """Drop the stub rows whose path is no name (``odd_stub_paths``); how many."""
        return self.db.execute(f"DELETE FROM stubs WHERE NOT {_NAMED}").rowcount

    def replace_stubs(self, rows: Iterable[tuple]) -> None:
        """Replace the stub table with a fresh scan's rows (path, oid, size, mtime_ns, stashed_at
        [, ino, ctime_ns])."""
        rows = [tuple(r) + (None,) * (7 - len(r)) for r in rows]
        with self.transaction():
            self.db.execute("DELETE FROM stubs")
            self.db.executemany(f"INSERT OR REPLACE INTO stubs {_STUB_COLS} VALUES (?,?,?,?,?,?,?)",
                                [(_b(r[0]),) + r[1:] for r in rows])

    # -- objects on remotes ---------------------------------------------------------------
    def remotes_of(self, oids: Iterable[str]) -> dict[str, set[str]]:
        """The remotes known to hold each of ``oids`` (one query for a whole batch)."""
        oids = list(set(oids))
        out: dict[str, set[str]] = {oid: set() for oid in oids}
        for oid, remote in self._where_in("SELECT oid, remote FROM locations", "oid", oids):
            out[oid].add(remote)
        return out

    def record_location(self, oid: str, remote: str, size: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO locations VALUES (?,?,?,?)", (oid, remote, size, time.time()))

    def objects_only_on(self, remote: str) -> int:
        """How many objects referenced by stubs are known to live on ``remote`` and nowhere else."""
        (n,) = self.db.execute(
            """SELECT COUNT(DISTINCT s.oid) FROM stubs s
               WHERE EXISTS (SELECT 1 FROM locations l WHERE l.oid = s.oid AND l.remote = ?)
                 AND NOT EXISTS (SELECT 1 FROM locations l WHERE l.oid = s.oid AND l.remote != ?)""",
            (remote, remote),
        ).fetchone()
        return n

    def locations_on(self, remote: str) -> dict[str, tuple[int, float]]:
        """``{oid: (size, stored_at)}`` of the objects recorded on ``remote``."""
        return {o: (size, at) for o, size, at in
                self.db.execute("SELECT oid, size, stored_at FROM locations WHERE remote = ?", (remote,))}

    def forget_location(self, oid: str, remote: str) -> None:
        """``remote`` no longer holds ``oid`` (it was removed from it)."""
        self.db.execute("DELETE FROM locations WHERE oid = ? AND remote = ?", (oid, remote))

    def forget_remote(self, remote: str) -> None:
        """Remote ``remote`` was removed from the config: its location rows (and scrub records)
        go, so a remote added later under that name vouches for none of its old copies."""
        self.db.execute("DELETE FROM locations WHERE remote = ?", (remote,))
        self.db.execute("DELETE FROM verified WHERE remote = ?", (remote,))

    def oids(self) -> set[str]:
        """Every object id a stub row of this root refers to."""
        return {oid for (oid,) in self.db.execute("SELECT DISTINCT oid FROM stubs")}

    def upsert_stubs(self, rows: Iterable[tuple], gone: Iterable[str] = ()) -> None:
        """Record (or replace) the stub rows of a partial scan and drop the rows of ``gone``
        paths, in one transaction (``replace_stubs`` is for a scan of the whole root)."""
        rows = [tuple(r) + (None,) * (7 - len(r)) for r in rows]
        with self.transaction():
            self.db.executemany("DELETE FROM stubs WHERE path = ?", [(_b(p),) for p in gone])
            self.db.executemany(f"INSERT OR REPLACE INTO stubs {_STUB_COLS} VALUES (?,?,?,?,?,?,?)",
                                [(_b(r[0]),) + r[1:] for r in rows])

    # -- scrub records (doctor --deep) -----------------------------------------------------
    def verified(self, oid: str, remote: str, at: float | None = None) -> None:
        """Record that ``remote``'s copy of ``oid`` was read back and hashed at ``at`` (now).
        Committed at once: a scrub that is interrupted keeps what it verified."""
        self.db.execute("INSERT INTO verified VALUES (?,?,?) ON CONFLICT(oid, remote) DO UPDATE SET "
                        "at = max(at, excluded.at)", (oid, remote, time.time() if at is None else at))

    def verified_since(self, since: float) -> set[tuple[str, str]]:
        """``(oid, remote)`` of the copies verified at or after ``since``."""
        return {(o, r) for o, r in self.db.execute("SELECT oid, remote FROM verified WHERE at >= ?", (since,))}

    def verified_at(self) -> dict[tuple[str, str], float]:
        return {(o, r): at for o, r, at in self.db.execute("SELECT oid, remote, at FROM verified")}

    # -- uses and pins (policies) ---------------------------------------------------------
    def record_use(self, paths: Iterable[str], when: float | None = None) -> None:
        """Record a use of ``paths`` at ``when`` (now); a newer use already recorded stays."""
        when = time.time() if when is None else when
        self.db.executemany("INSERT INTO uses VALUES (?,?) ON CONFLICT(path) DO UPDATE SET "
                            "last_used = max(last_used, excluded.last_used)", [(_b(p), when) for p in paths])

    def uses(self) -> dict[str, float]:
        return {_s(p): t for p, t in self.db.execute(f"SELECT path, last_used FROM uses WHERE {_NAMED}")}

    def pins(self) -> set[str]:
        return {_s(p) for (p,) in self.db.execute(f"SELECT path FROM pins WHERE {_NAMED}")}

    def pin(self, paths: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO pins VALUES (?)", [(_b(p),) for p in paths])

    def unpin(self, paths: Iterable[str]) -> int:
        cur = self.db.executemany("DELETE FROM pins WHERE path = ?", [(_b(p),) for p in paths])
        return cur.rowcount


class _Tx:
    def __init__(self, db: _Db, keep_on_error: bool = False):
        self.db = db
        self.keep_on_error = keep_on_error

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, *rest):
        self.db.execute("ROLLBACK" if exc_type and not self.keep_on_error else "COMMIT")

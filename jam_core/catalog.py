"""The catalog: an SQLite index of a root's stubs, the objects on each remote, uses and pins.

It is an index, not the truth: the stubs' own metadata is. ``rebuild`` recreates the stub
table from a scan, so a ``mv`` of a stub, or a lost catalog, costs nothing but a scan.
Paths are stored as bytes relative to the root (names need not be UTF-8).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS stubs (
    path BLOB PRIMARY KEY,
    oid TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    stashed_at TEXT NOT NULL
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


def _b(path: str) -> bytes:
    return os.fsencode(path)


def _s(path: bytes) -> str:
    return os.fsdecode(path)


class Catalog:
    def __init__(self, db_path: Path):
        self.db = sqlite3.connect(db_path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

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
    def add_stub(self, path: str, oid: str, size: int, mtime_ns: int, stashed_at: str, remotes: Iterable[str]) -> None:
        self.db.execute("INSERT OR REPLACE INTO stubs VALUES (?,?,?,?,?)", (_b(path), oid, size, mtime_ns, stashed_at))
        now = time.time()
        self.db.executemany("INSERT OR IGNORE INTO locations VALUES (?,?,?,?)",
                            [(oid, r, size, now) for r in remotes])

    def remove_stub(self, path: str) -> None:
        self.db.execute("DELETE FROM stubs WHERE path = ?", (_b(path),))

    def stubs(self) -> dict[str, tuple[str, int]]:
        return {_s(p): (oid, size) for p, oid, size in self.db.execute("SELECT path, oid, size FROM stubs")}

    def stub_stats(self, under: str = ".") -> dict[bytes, tuple[int, int]]:
        """``{path (bytes): (size, mtime_ns)}`` of the stubs at or under ``under``: what a scan
        needs to recognise an unchanged stub from its stat alone."""
        if under == ".":
            rows = self.db.execute("SELECT path, size, mtime_ns FROM stubs")
        else:
            prefix = _b(under)
            rows = self.db.execute("SELECT path, size, mtime_ns FROM stubs WHERE path = ? OR "
                                   "(path >= ? AND path < ?)", (prefix, prefix + b"/", prefix + b"0"))
        return {p: (size, mtime) for p, size, mtime in rows}

    def replace_stubs(self, rows: Iterable[tuple[str, str, int, int, str]]) -> None:
        """Replace the stub table with a fresh scan's rows (path, oid, size, mtime_ns, stashed_at)."""
        with self.transaction():
            self.db.execute("DELETE FROM stubs")
            self.db.executemany("INSERT OR REPLACE INTO stubs VALUES (?,?,?,?,?)",
                                [(_b(p), o, s, m, t) for p, o, s, m, t in rows])

    # -- objects on remotes ---------------------------------------------------------------
    def remotes_of(self, oids: Iterable[str]) -> dict[str, set[str]]:
        """The remotes known to hold each of ``oids`` (one query for a whole batch)."""
        oids = list(set(oids))
        out: dict[str, set[str]] = {oid: set() for oid in oids}
        for i in range(0, len(oids), 500):  # SQLite's limit on bound parameters
            chunk = oids[i:i + 500]
            rows = self.db.execute(f"SELECT oid, remote FROM locations WHERE oid IN ({','.join('?' * len(chunk))})",
                                   chunk)
            for oid, remote in rows:
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

    # -- uses and pins (policies) ---------------------------------------------------------
    def record_use(self, paths: Iterable[str], when: float | None = None) -> None:
        """Record a use of ``paths`` at ``when`` (now); a newer use already recorded stays."""
        when = time.time() if when is None else when
        self.db.executemany("INSERT INTO uses VALUES (?,?) ON CONFLICT(path) DO UPDATE SET "
                            "last_used = max(last_used, excluded.last_used)", [(_b(p), when) for p in paths])

    def uses(self) -> dict[str, float]:
        return {_s(p): t for p, t in self.db.execute("SELECT path, last_used FROM uses")}

    def pins(self) -> set[str]:
        return {_s(p) for (p,) in self.db.execute("SELECT path FROM pins")}

    def pin(self, paths: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO pins VALUES (?)", [(_b(p),) for p in paths])

    def unpin(self, paths: Iterable[str]) -> int:
        cur = self.db.executemany("DELETE FROM pins WHERE path = ?", [(_b(p),) for p in paths])
        return cur.rowcount


class _Tx:
    def __init__(self, db: sqlite3.Connection, keep_on_error: bool = False):
        self.db = db
        self.keep_on_error = keep_on_error

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, *rest):
        self.db.execute("ROLLBACK" if exc_type and not self.keep_on_error else "COMMIT")

"""A stub is what its bytes say (issue 8): copies without xattrs, edits with the mtime put
back, damaged xattrs and headers, damaged/locked catalogs and a full disk. Real files, real
xattrs, the real `jam` in a subprocess."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest

from jam_core.catalog import Catalog
from jam_core.stub import HEADER_MAX, XATTR, BadStub, read_record, record_from_block, verify_clean, verify_clean_path
from tests.conftest import make_file
from tests.safety_support import fingerprint, jam, make_tree, record, status_json

SIZE = 300_000


@pytest.fixture
def stashed(tmp_path):
    t = make_tree(tmp_path)
    data = make_file(t.root / "a.bin", SIZE, seed=11)
    jam("stash", "a.bin", cwd=t.root)
    assert record(t.root / "a.bin") is not None
    return t, data


def doctor(t, *args, check):
    return json.loads(jam("doctor", "--json", *args, cwd=t.root, check=check).out)


def kinds(out):
    return [(p["kind"], p["path"], p["fixed"]) for p in out["problems"]]


def _edit_keeping_stat(path, offset: int, data: bytes, same_blocks: bool = True) -> None:
    """Write into a stub and put its mtime (and mode) back, as `rsync --inplace -t` does."""
    st = os.lstat(path)
    os.chmod(path, 0o644)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(path, st.st_mode & 0o7777)
    after = os.lstat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert after.st_blocks == st.st_blocks or not same_blocks


# -- 1. a plain cp of a stub ---------------------------------------------------------------------
def test_cp_of_a_stub_is_a_stub_everywhere(stashed):
    t, data = stashed
    subprocess.run(["cp", "a.bin", "copy.bin"], cwd=t.root, check=True)  # drops xattrs, keeps the header
    assert read_record(str(t.root / "copy.bin")) is None
    st = status_json(t.root)
    assert (st["total"]["stubs"], st["total"]["local"]) == (2, 0), st
    assert [p["path"] for p in st["problems"]] == ["copy.bin"]
    jam("checkout", "copy.bin", cwd=t.root)
    assert (t.root / "copy.bin").read_bytes() == data


def test_cp_of_a_stub_is_reported_and_fixed_by_doctor(stashed):
    t, data = stashed
    subprocess.run(["cp", "a.bin", "copy.bin"], cwd=t.root, check=True)
    assert kinds(doctor(t, check=1)) == [("lost-xattr", "copy.bin", False)]
    assert kinds(doctor(t, "--fix", check=0)) == [("lost-xattr", "copy.bin", True)]
    assert record(t.root / "copy.bin") == record(t.root / "a.bin")
    assert doctor(t, check=0)["stubs"] == 2
    jam("checkout", "copy.bin", cwd=t.root)
    assert (t.root / "copy.bin").read_bytes() == data


def test_record_from_block(stashed):
    t, _ = stashed
    head = (t.root / "a.bin").read_bytes()[:HEADER_MAX]
    assert record_from_block(head, SIZE).oid == record(t.root / "a.bin").oid
    assert record_from_block(b"just a file", SIZE) is None
    with pytest.raises(BadStub, match="header says"):
        record_from_block(head, SIZE + 1)


def test_copy_written_into_is_dirty_not_fetched_over(stashed):
    t, _ = stashed
    subprocess.run(["cp", "a.bin", "copy.bin"], cwd=t.root, check=True)
    _edit_keeping_stat(t.root / "copy.bin", 100_000, b"my own words", same_blocks=False)
    before = fingerprint(t.root / "copy.bin")
    st = status_json(t.root)
    assert st["total"]["dirty"] == 1, st
    jam("checkout", "copy.bin", cwd=t.root, check=None)
    assert fingerprint(t.root / "copy.bin") == before


# -- 2. a stub edited with its mtime put back -----------------------------------------------------
@pytest.mark.parametrize("offset", [40, 3000], ids=["in the header", "in the block's padding"])
def test_stub_edited_with_mtime_restored_is_dirty(stashed, offset):
    t, _ = stashed
    p = t.root / "a.bin"
    doctor(t, "--fix", check=0)  # the catalog now vouches for the stub's inode and ctime
    rec = record(p)
    assert verify_clean_path(p, rec)
    _edit_keeping_stat(p, offset, b"EDITED")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert verify_clean(fd, rec) is False
    finally:
        os.close(fd)
    st = status_json(t.root)
    assert (st["total"]["dirty"], st["total"]["stubs"]) == (1, 0), st
    out = doctor(t, check=1)
    assert kinds(out) == [("dirty", "a.bin", False)]
    assert "jam checkout --keep-both a.bin" in out["problems"][0]["detail"]
    before = fingerprint(p)
    doctor(t, "--fix", check=1)  # a dirty stub's bytes are never touched
    assert fingerprint(p) == before


def test_moved_intact_stub_is_clean(stashed):
    t, data = stashed
    doctor(t, "--fix", check=0)
    (t.root / "d").mkdir()
    os.rename(t.root / "a.bin", t.root / "d" / "moved.bin")  # a new ctime, same bytes
    st = status_json(t.root)
    assert (st["total"]["stubs"], st["total"]["dirty"]) == (1, 0), st
    # not dirty; the catalog still has the old path, which doctor says (issue 10) and --fix updates
    out = doctor(t, check=1)
    assert out["stubs"] == 1 and kinds(out) == [("catalog-moved", "d/moved.bin", False)]
    assert kinds(doctor(t, "--fix", check=0)) == [("catalog-moved", "d/moved.bin", True)]
    assert doctor(t, check=0)["stubs"] == 1
    jam("checkout", "d/moved.bin", cwd=t.root)
    assert (t.root / "d" / "moved.bin").read_bytes() == data


def test_catalog_migrates_and_records_ino_ctime(tmp_path):
    db = tmp_path / "old.db"
    old = sqlite3.connect(db)
    old.executescript("CREATE TABLE stubs (path BLOB PRIMARY KEY, oid TEXT NOT NULL, size INTEGER NOT NULL,"
                      " mtime_ns INTEGER NOT NULL, stashed_at TEXT NOT NULL);"
                      "INSERT INTO stubs VALUES (x'612e62696e', 'b3:00', 1, 2, '');")
    old.commit()
    old.close()
    with Catalog(db) as cat:
        assert cat.stub_stamps() == {b"a.bin": (1, 2, None, None)}
        cat.add_stub("b.bin", "b3:" + "0" * 64, 3, 4, "", ["vault"], ino=5, ctime_ns=6)
        assert cat.stub_stamps()[b"b.bin"] == (3, 4, 5, 6)


# -- 3. a damaged xattr beside an intact header, and the other way round ------------------------------
def test_damaged_xattr_is_restored_from_the_header(stashed):
    t, data = stashed
    p = t.root / "a.bin"
    good = os.getxattr(p, XATTR)
    os.setxattr(p, XATTR, b"\x01garbage")
    assert kinds(doctor(t, check=1)) == [("bad-metadata", "a.bin", False)]
    assert kinds(doctor(t, "--fix", check=0)) == [("bad-metadata", "a.bin", True)]
    assert os.getxattr(p, XATTR) == good
    assert kinds(doctor(t, check=0)) == []
    jam("checkout", "a.bin", cwd=t.root)
    assert p.read_bytes() == data


def test_lost_header_is_written_again_from_the_xattr(stashed):
    t, data = stashed
    p = t.root / "a.bin"
    rec = record(p)
    _edit_keeping_stat(p, 0, b"\0" * HEADER_MAX)  # the header block lost to zeros
    assert kinds(doctor(t, check=1)) == [("bad-header", "a.bin", False)]
    assert kinds(doctor(t, "--fix", check=0)) == [("bad-header", "a.bin", True)]
    assert verify_clean_path(p, rec)
    assert p.read_bytes()[:40].startswith(b"# jam stub v1\n")
    assert kinds(doctor(t, check=0)) == []
    jam("checkout", "a.bin", cwd=t.root)
    assert p.read_bytes() == data


# -- 4. a damaged, locked or full catalog -----------------------------------------------------------
def _one_line(res, *words):
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jam: "), res.err
    for w in words:
        assert w in lines[0], res.err


def test_garbage_catalog_is_one_line_and_doctor_fix_rebuilds_it(stashed):
    t, data = stashed
    db = t.root / ".jam" / "catalog.db"
    for side in (".jam/catalog.db-wal", ".jam/catalog.db-shm"):
        if (t.root / side).exists():
            (t.root / side).unlink()
    db.write_bytes(os.urandom(8192))
    res = jam("status", cwd=t.root, check=1)
    _one_line(res, f"the catalog {db} is damaged", "jam doctor --fix")
    out = doctor(t, check=1)
    assert ("catalog", ".jam/catalog.db", False) in kinds(out)
    out = doctor(t, "--fix", check=0)
    assert kinds(out) == [("catalog", ".jam/catalog.db", True)] and out["stubs"] == 1
    assert len(list((t.root / ".jam").glob("catalog.db.damaged-*"))) == 1
    with Catalog(db) as cat:
        assert list(cat.stubs()) == ["a.bin"]
        assert cat.remotes_of([record(t.root / "a.bin").oid]) != {}
    assert status_json(t.root)["total"]["stubs"] == 1
    jam("checkout", "a.bin", cwd=t.root)
    assert (t.root / "a.bin").read_bytes() == data


def test_locked_catalog_is_one_line(stashed):
    t, _ = stashed
    holder = sqlite3.connect(t.root / ".jam" / "catalog.db", isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM uses")
        res = jam("checkout", "a.bin", cwd=t.root, check=1)
        _one_line(res, "is locked by another jam process")
        # status only reads, and the catalog is its cache: it reads every possible stub instead
        assert json.loads(jam("status", "--json", cwd=t.root).out)["total"]["stubs"] == 1
    finally:
        holder.close()
    assert status_json(t.root)["total"]["stubs"] == 1


def test_full_disk_for_the_catalog_is_one_line(stashed):
    t, _ = stashed
    jamdir = t.root / ".jam"
    saved = {p.name: p.read_bytes() for p in jamdir.iterdir() if p.is_file() and not p.name.startswith("catalog.db")}
    # (not the cd index: a root that had stubs and lost its catalog is refused before any write)
    dirs = [p.name for p in jamdir.iterdir() if p.is_dir() and p.name != "stubdirs"]
    with Catalog(jamdir / "catalog.db") as cat:
        rows = cat.stubs()
    assert rows
    for p in jamdir.glob("catalog.db*"):
        p.unlink()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(jamdir)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        for name in dirs:
            (jamdir / name).mkdir()
        for name, body in saved.items():
            (jamdir / name).write_bytes(body)
        try:  # fill the disk
            with open(jamdir / "filler", "wb") as f:
                while True:
                    f.write(b"\xff" * 4096)
                    f.flush()
        except OSError:
            pass
        make_file(t.root / "b.bin", 10_000, seed=2)
        res = jam("stash", "b.bin", cwd=t.root, check=1)
        _one_line(res, "no space left on the local disk for the catalog", str(jamdir / "catalog.db"))
        assert read_record(str(t.root / "b.bin")) is None  # nothing stashed without its catalog row
    finally:
        subprocess.run(["umount", "-l", str(jamdir)], check=True)


# -- 5. doctor names a file that is not a stub ------------------------------------------------------
def test_doctor_of_a_local_file_names_it(stashed):
    t, _ = stashed
    make_file(t.root / "local.txt", 100, seed=3)
    out = doctor(t, "local.txt", check=1)
    assert kinds(out) == [("not-a-stub", "local.txt", False)] and out["stubs"] == 0


def test_header_naming_another_object_is_not_clean(stashed):
    """A header edited into a valid one for another object (mtime put back) is not this stub."""
    t, _ = stashed
    p = t.root / "a.bin"
    rec = record(p)
    block = p.read_bytes()[:HEADER_MAX]
    i = block.index(rec.oid.encode()) + len(rec.oid) - 1
    other = b"0" if block[i:i + 1] != b"0" else b"1"
    _edit_keeping_stat(p, i, other)
    assert record_from_block(p.read_bytes()[:HEADER_MAX], SIZE).oid != rec.oid
    assert verify_clean_path(p, rec) is False

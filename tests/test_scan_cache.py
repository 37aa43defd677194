"""The catalog as a cache of the scan (issue 13): a stub whose lstat still matches the stamp the
catalog holds (size, mtime, inode, ctime) is trusted without being opened; anything else is read
and checked. Real stubs (stashed to the embedded dir remote), real xattrs, real files; the
opens are counted by wrapping the functions that read a stub (``os.open``, the xattr read, the
header check)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from jam_core.root import CATALOG
from tests.conftest import make_file

SIZE = 100_000


class Reads:
    """Counts every open, xattr read and header check of the files named in ``watched``."""

    def __init__(self, monkeypatch, watched):
        import jam_core.scan as scan
        import jam_core.stub as stub

        self.watched = set(watched)
        self.opens: list[str] = []
        self.xattrs: list[str] = []
        self.headers = 0
        real_open, real_getxattr, real_verify = os.open, scan.getxattr, stub.verify_clean

        def counting_open(path, *a, **kw):
            if os.path.basename(os.fsdecode(path)) in self.watched:
                self.opens.append(os.fsdecode(path))
            return real_open(path, *a, **kw)

        def counting_getxattr(path, *a, **kw):
            if not isinstance(path, int) and os.path.basename(os.fsdecode(path)) in self.watched:
                self.xattrs.append(os.fsdecode(path))
            return real_getxattr(path, *a, **kw)

        def counting_verify(fd, rec):
            self.headers += 1
            return real_verify(fd, rec)

        monkeypatch.setattr(os, "open", counting_open)
        monkeypatch.setattr(scan, "getxattr", counting_getxattr)
        monkeypatch.setattr(stub, "verify_clean", counting_verify)

    def reset(self) -> None:
        self.opens.clear()
        self.xattrs.clear()
        self.headers = 0

    @property
    def total(self) -> int:
        return len(self.opens) + len(self.xattrs) + self.headers


def stashed(jam_root, runner, n: int = 4) -> list[str]:
    from jam_core.cli import main

    names = [f"f{i}.bin" for i in range(n)]
    for i, name in enumerate(names):
        make_file(jam_root.path / "d" / name, SIZE, i)
    res = runner.invoke(main, ["stash", "d"])
    assert res.exit_code == 0, res.output + res.stderr
    return names


def stamps(root) -> dict[bytes, tuple]:
    from jam_core.catalog import Catalog

    with Catalog(root.jam_dir / CATALOG) as cat:
        return cat.stub_stamps()


def forget_stamps(root) -> None:
    """The rows stay, their inode and ctime go (a catalog an older jam wrote)."""
    con = sqlite3.connect(root.jam_dir / CATALOG)
    with con:
        con.execute("UPDATE stubs SET ino = NULL, ctime_ns = NULL")
    con.close()


def test_a_repeated_status_opens_no_unchanged_stub(jam_root, runner, monkeypatch):
    """The first status reads each stub the catalog cannot vouch for and records its stamp;
    the second, with nothing changed, opens none of them (no open, no xattr, no header)."""
    from jam_core.ops.status import status

    names = stashed(jam_root, runner)
    forget_stamps(jam_root)
    reads = Reads(monkeypatch, names)
    first = status(jam_root)
    assert first.total.stubs == len(names) and not first.problems
    assert reads.headers == len(names), "the first status checks every stub's bytes"
    reads.reset()
    second = status(jam_root)
    assert second.total.stubs == len(names) and not second.problems
    assert reads.total == 0, (reads.opens, reads.xattrs, reads.headers)
    assert all(v[2] is not None and v[3] is not None for v in stamps(jam_root).values())


def test_a_stub_written_into_behind_jams_back_is_rechecked(jam_root, runner, monkeypatch):
    """Bytes of a trusted stub changed with its size, mtime and inode put back (the ctime
    moved): the stamp no longer matches, the stub is read, the write is found; and status
    never records the stamp of a stub it found dirty."""
    from jam_core.ops.status import status

    names = stashed(jam_root, runner)
    status(jam_root)
    p = jam_root.path / "d" / names[0]
    st = os.lstat(p)
    before = stamps(jam_root)[f"d/{names[0]}".encode()]
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(20)
        f.write(b"not what jam wrote")
    os.chmod(p, st.st_mode & 0o7777)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.lstat(p)
    assert (now.st_size, now.st_mtime_ns, now.st_ino, now.st_blocks) == (st.st_size, st.st_mtime_ns, st.st_ino,
                                                                         st.st_blocks)
    reads = Reads(monkeypatch, names)
    for _ in range(2):
        res = status(jam_root)
        assert res.total.dirty == 1 and res.total.stubs == len(names) - 1
        assert [p for p, _ in res.problems] == [f"d/{names[0]}"]
    assert reads.headers == 2, "the tampered stub is checked each time, the others are trusted"
    assert stamps(jam_root)[f"d/{names[0]}".encode()] == before


def test_a_stub_replaced_by_a_lookalike_with_the_same_size_and_mtime_is_rechecked(jam_root, runner):
    """Another file renamed over the stub, with the same size, mtime, mode and xattr but bytes
    that are not the stub's: its inode and ctime differ, so it is read, and found wrong."""
    from jam_core.ops.status import status
    from jam_core.stub import XATTR

    names = stashed(jam_root, runner)
    status(jam_root)
    p = jam_root.path / "d" / names[1]
    st = os.lstat(p)
    fake = jam_root.path / "d" / "lookalike"
    header = p.read_bytes()[:4096]
    with open(fake, "wb") as f:
        f.write(header[:4000] + b"not a stub's zeros")  # still in the first block: no block more
        f.truncate(st.st_size)
    os.setxattr(fake, XATTR, os.getxattr(p, XATTR))
    os.chmod(fake, st.st_mode & 0o7777)
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(fake, p)
    now = os.lstat(p)
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and now.st_ino != st.st_ino
    res = status(jam_root)
    assert res.total.dirty == 1 and [p for p, _ in res.problems] == [f"d/{names[1]}"]


def test_a_clean_stub_of_other_content_gets_no_stamp_on_the_row_of_the_old_one(jam_root, runner):
    """A stub of another file moved over a stub: it is clean, but the catalog's row names the
    old content; its stamp must not be recorded there, or later scans (doctor among them) would
    take the new file for the old object's stub."""
    from jam_core.ops.status import status

    names = stashed(jam_root, runner)
    status(jam_root)
    a, b = (jam_root.path / "d" / n for n in names[:2])
    os.rename(b, a)  # a clean stub, but of f1's content, now at d/f0.bin
    before = stamps(jam_root)[f"d/{names[0]}".encode()]
    res = status(jam_root)
    assert res.total.stubs == len(names) - 1 and res.total.dirty == 0
    assert stamps(jam_root)[f"d/{names[0]}".encode()] == before


def test_status_records_no_stamp_while_another_jam_holds_the_root(jam_root, runner):
    """Recording stamps is a cache write: with another jam working on the root it is skipped
    (never waited for), and status still answers."""
    from jam_core.ops.status import status

    names = stashed(jam_root, runner)
    forget_stamps(jam_root)
    with jam_root.lock():
        res = status(jam_root)
    assert res.total.stubs == len(names)
    assert all(v[2] is None for v in stamps(jam_root).values())
    status(jam_root)
    assert all(v[2] is not None for v in stamps(jam_root).values())


def test_a_copy_of_a_stub_that_lost_its_xattr_is_still_found_by_status(jam_root, runner):
    """A read-only file with no xattr is still opened by the quick look: a copy of a stub
    (here written out in full, holes and all, as ``shutil.copyfile`` and ``rsync`` without
    ``-S`` do) is recognised by its header."""
    import shutil

    from jam_core.ops.status import status

    names = stashed(jam_root, runner, 1)
    shutil.copyfile(jam_root.path / "d" / names[0], jam_root.path / "copy.bin")  # data only, not sparse
    os.chmod(jam_root.path / "copy.bin", 0o444)
    res = status(jam_root)
    assert res.total.stubs == 2
    assert [p for p, _ in res.problems] == ["copy.bin"]


@pytest.mark.parametrize("kind", ["root", "remote"])
def test_status_never_counts_a_nested_root_or_remote(jam_root, kind):
    """A directory holding another root (``.jam/``) or a remote (its identity marker) is not
    this root's to count, told from the names in its listing."""
    from jam_core.objects import MARKER_NAME, marker_bytes
    from jam_core.ops.status import status

    inner = jam_root.path / "inner"
    make_file(inner / "sub" / "x.bin", 1000, 1)
    make_file(jam_root.path / "mine.bin", 1000, 2)
    if kind == "root":
        (inner / ".jam").mkdir()
    else:
        (inner / MARKER_NAME).write_bytes(marker_bytes("0123456789abcdef0123456789abcdef"))
    res = status(jam_root)
    assert res.total.files == 1 and set(res.directories) == {"."}


def test_policy_records_are_the_files_record(jam_root):
    """The records a dry-run builds by slot are FileRecords equal to the class's own, frozen."""
    import dataclasses

    from jam_core.model import FileRecord
    from jam_core.policy.records import _record

    args = ("a/b", 12, 1.5, 2.5, 3.5, "local", False, 1)
    r = _record(*args)
    assert type(r) is FileRecord and r == FileRecord(*args) and hash(r) == hash(FileRecord(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.size = 1


def test_dry_run_trusts_stamped_stubs_and_reads_the_rest(jam_root, runner, monkeypatch):
    """The policies' scan trusts a stamped stub without its xattr and still reads one the stamp
    does not vouch for."""
    from jam_core.policy.records import inventory

    names = stashed(jam_root, runner)
    p = jam_root.path / "d" / names[2]
    os.chmod(p, os.lstat(p).st_mode & 0o7777)  # the same mode: only the ctime moves
    reads = Reads(monkeypatch, names)
    inv = inventory(jam_root)
    assert sorted(inv.stubs) == sorted(f"d/{n}" for n in names)
    assert len(reads.xattrs) == 1 and reads.xattrs[0].endswith(names[2])


@pytest.mark.parametrize("ordered", [True, False])
def test_a_large_directory_comes_in_parts_that_add_up_to_one_walk(jam_root, ordered):
    """``scan_stats(chunk=N)`` (doctor's walk: a million files in one directory never held as a
    million lstats): the same directory comes in parts of at most N files, in order when
    ordered, that add up to exactly what one walk yields: jam's temporary files left out of
    every part, a nested root's files in none."""
    from jam_core.scan import scan_stats

    for i in range(23):
        make_file(jam_root.path / "big" / f"f{i:03d}", 10, i)
    make_file(jam_root.path / "big" / ".jam-0123456789abcdef.tmp", 10, 99)  # in the middle of the order
    make_file(jam_root.path / "big" / "zz" / "inner.bin", 10, 98)
    make_file(jam_root.path / "nested" / "n.bin", 10, 97)
    (jam_root.path / "nested" / ".jam").mkdir()
    top = str(jam_root.path)

    def walk(chunk):
        return [(d, names, [(st.st_ino, st.st_size) for st in stats])
                for d, _, names, stats in scan_stats(top, ".", ordered=ordered, chunk=chunk)]

    whole = walk(None)
    parts = walk(5)
    sizes = [len(n) for d, n, _ in parts if d == "big"]
    assert len(sizes) == 5 and max(sizes) == 5 and sum(sizes) == 23, sizes  # (24 listed, 23 but the temporary)
    joined: dict[str, tuple[list, list]] = {}
    for d, names, stats in parts:
        joined.setdefault(d, ([], []))
        joined[d][0].extend(names)
        joined[d][1].extend(stats)
    assert {d: (sorted(n), sorted(s)) for d, (n, s) in joined.items()} == {
        d: (sorted(n), sorted(s)) for d, n, s in whole}
    assert set(joined) == {"big", "big/zz"} and len(joined["big"][0]) == 23
    if ordered:
        assert joined["big"][0] == sorted(joined["big"][0])


@pytest.mark.parametrize("others", [0, 1500])
def test_the_roots_own_stubs_are_known_by_name(jam_root, runner, monkeypatch, others):
    """The rows of the stubs directly in the root lie all over the catalog's order: status finds
    them by the names it walks (a few), or all at once (a root of more files than one part of a
    walk). Either way a small stub made writable (not sparse: only its row says it is a stub)
    is counted as a stub, and a repeated status opens none of the untouched ones.
    Mutation-checked: with either way answering nothing, the writable stub is counted local."""
    from jam_core.cli import main
    from jam_core.ops.status import status
    from jam_core.scan import PART

    big = [f"top{i}.bin" for i in range(3)]
    for i, name in enumerate(big):
        make_file(jam_root.path / name, SIZE, i)
    make_file(jam_root.path / "small.cfg", 3000, 9)
    res = runner.invoke(main, ["stash", *big, "small.cfg"])
    assert res.exit_code == 0 and "stashed 4 files" in res.output, res.output + res.stderr
    os.chmod(jam_root.path / "small.cfg", 0o664)
    for i in range(others):
        (jam_root.path / f"other{i:05d}").write_bytes(b"x")
    assert others == 0 or others > PART  # (the root's listing then comes in parts)
    first = status(jam_root)
    assert (first.total.stubs, first.total.local, first.total.stub_bytes) == (4, others, 3 * SIZE + 3000)
    reads = Reads(monkeypatch, big)
    second = status(jam_root)
    assert (second.total.stubs, second.total.local) == (4, others) and not second.problems
    assert not reads.opens and not reads.xattrs, (reads.opens, reads.xattrs)
    assert reads.headers == 1  # the writable one alone is checked again (a writable stub is never trusted)

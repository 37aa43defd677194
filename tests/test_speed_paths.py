"""The fast paths of stash and checkout keep the safety invariants (issue 13).

* one syncfs per batch, not an fsync per file or directory: a syncfs that fails swaps nothing
  (stash and checkout), and a stash's last swaps are made durable before it says done;
* the dir backend copies and hashes in one read of the source: a change in the middle of the
  copy is caught without reading the copy back, and holes stay holes;
* read leases: the kernel's break notice reaches jam's watching thread (no polling).
"""

from __future__ import annotations

import errno
import os
import threading

import blake3
import pytest

import jam_core.ops.checkout as checkout_mod
import jam_core.ops.stash as stash_mod
from jam_core.errors import IntegrityError
from jam_core.fs import Leases
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.ops.checkout import checkout
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, fingerprint, is_stub, make_tree, objects_verify, on_another_disk


def _tree(tmp_path, n=3, size=100_000):
    t = make_tree(tmp_path)
    for i in range(n):
        make_file(t.root / f"f{i}", size, seed=300 + i)
    return t


def _no_jam_tmp(d) -> bool:
    return not [n for n in os.listdir(d) if n.startswith(".jam-")]


def test_a_failed_syncfs_swaps_nothing_in_a_stash(tmp_path, monkeypatch):
    """The batch's stubs are written aside before the one syncfs; if it fails, no file is
    swapped for its stub and the stubs aside are gone (a remote on the files' own disk links
    them only after it: they are untouched)."""
    t = _tree(tmp_path)
    fps = {n: fingerprint(t.root / n) for n in ("f0", "f1", "f2")}
    calls = []

    def failing_syncfs(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(stash_mod, "syncfs", failing_syncfs)
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert calls, "the stash never made its batch durable"
    assert not res.done and res.aborted and res.exit_code == 1, res
    assert {n: fingerprint(t.root / n) for n in fps} == fps
    assert not any(is_stub(t.root / n) for n in fps)
    assert _no_jam_tmp(t.root)


def test_a_stash_ends_with_a_syncfs_after_its_last_swap(tmp_path, monkeypatch):
    """The per-directory fsyncs are gone: the last swaps are made durable by one syncfs
    after them, before the stash reports them done."""
    t = _tree(tmp_path, n=2)
    events = []
    real_swap, real_syncfs = stash_mod._swap, stash_mod.syncfs
    monkeypatch.setattr(stash_mod, "_swap", lambda s, leases: events.append("swap") or real_swap(s, leases))
    monkeypatch.setattr(stash_mod, "syncfs", lambda fd: events.append("syncfs") or real_syncfs(fd))
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(), s)
    assert len(res.done) == 2, res
    assert events[0] == "syncfs" and events[-1] == "syncfs", events
    assert events.index("swap") > events.index("syncfs")


def test_a_failed_remote_sync_swaps_nothing(tmp_path, monkeypatch):
    """The remote's own sync (the dir backend's syncfs) now runs after the stubs are
    written aside: failing, it still leaves every file as it was."""
    import jam_dir

    t = _tree(tmp_path)
    fps = {n: fingerprint(t.root / n) for n in ("f0", "f1", "f2")}

    def failing(path_or_fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(jam_dir, "syncfs", failing)
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert not res.done and "vault" in res.aborted, res
    assert {n: fingerprint(t.root / n) for n in fps} == fps
    assert _no_jam_tmp(t.root)


def test_a_failed_syncfs_swaps_nothing_in_a_checkout(tmp_path, monkeypatch):
    t = _tree(tmp_path)
    with Session() as s:
        assert len(stash(Root(t.root), ["."], make_plugin_manager(), s).done) == 3
    stubs = {n: fingerprint(t.root / n) for n in ("f0", "f1", "f2")}

    def failing_syncfs(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(checkout_mod, "syncfs", failing_syncfs)
    with Session() as s:
        res = checkout(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert not res.done and "durable" in res.aborted and res.exit_code == 1, res
    assert {n: fingerprint(t.root / n) for n in stubs} == stubs
    assert all(is_stub(t.root / n) for n in stubs)
    assert _no_jam_tmp(t.root)


# -- the dir backend: one read of the source -----------------------------------------------------

def _sparse(path, size, extents):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            f.seek(off)
            f.write(os.urandom(n))


@pytest.mark.parametrize("size,extents", [
    (100_000, [(0, 100_000)]),  # small: read through
    (20 << 20, [(0, 1 << 20), (10 << 20, 1 << 20)]),  # data, hole, data, hole
    (24 << 20, [(5 << 20, 3 << 20)]),  # starts with a hole
])
def test_copy_hashing_hashes_what_it_writes_and_keeps_holes(tmp_path, size, extents):
    import jam_dir

    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse(src, size, extents)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        got, n = jam_dir._copy_hashing(sfd, dfd, size, "b3", lambda n: None)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert n == size and got == f"b3:{b3(src)}" == f"b3:{b3(dst)}"
    if size >= jam_dir._BIG:
        assert os.stat(dst).st_blocks * 512 <= sum(n for _, n in extents) + (1 << 20), "holes were written"


def test_a_change_in_the_middle_of_the_copy_is_caught_without_reading_it_back(tmp_path, monkeypatch):
    """The lease and stat checks aside: bytes that change between the core's hash and the
    backend's copy make the stored object's hash differ, so nothing is stored or swapped.
    (A large object is copied in the kernel and what the copy holds is hashed: the change is
    injected into what the copy wrote. The source itself is not read back.)"""
    import jam_dir

    on_another_disk(monkeypatch)
    t = make_tree(tmp_path)
    make_file(t.root / "big", 12 << 20, seed=9)
    fd = os.open(t.root / "big", os.O_RDONLY)
    os.fsync(fd)  # allocated now: its st_blocks cannot move under the fingerprint with writeback
    os.close(fd)
    real = os.copy_file_range
    flipped = []

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        n = real(src, dst, count, offset_src, offset_dst)
        if offset_dst is not None and offset_dst + n > 4 << 20 and not flipped and n:
            at = max(offset_dst, 4 << 20)
            os.pwrite(dst, bytes([os.pread(dst, 1, at)[0] ^ 0xFF]), at)  # a change on the disk under the copy
            flipped.append(at)
        return n

    monkeypatch.setattr(jam_dir.os, "copy_file_range", copy_file_range)
    fp = fingerprint(t.root / "big")
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    monkeypatch.undo()
    assert flipped and not res.done, res
    assert "changed while it was stored" in str(res.skipped + res.failed), res
    assert fingerprint(t.root / "big") == fp and not is_stub(t.root / "big")
    assert objects_verify(t.remote) == [] and not list((t.remote / "tmp").iterdir())


def test_copy_hashing_refuses_a_source_shorter_than_expected(tmp_path):
    import jam_dir

    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(IntegrityError):
            jam_dir._copy_hashing(sfd, dfd, 5000, "b3", lambda n: None)
    finally:
        os.close(sfd)
        os.close(dfd)


# -- leases: the kernel's notice, not a poll ----------------------------------------------------

def test_a_lease_break_notice_wakes_the_watcher_and_lets_the_writer_go(tmp_path, monkeypatch):
    """A writer opening a leased file is let through by the kernel's notice to the watching
    thread (polling is off: IDLE and POLL are an hour), and the lease is seen broken."""
    monkeypatch.setattr(Leases, "IDLE", 3600.0)
    monkeypatch.setattr(Leases, "POLL", 3600.0)
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDONLY)
    leases = Leases()
    opened = threading.Event()
    try:
        assert leases.take(fd)
        assert leases.intact(fd)

        def writer():
            w = os.open(path, os.O_WRONLY)  # blocks until jam releases the lease
            os.close(w)
            opened.set()

        th = threading.Thread(target=writer)
        th.start()
        th.join(timeout=30)  # the kernel's own lease-break-time is 45 s: a lost notice fails here
        assert opened.is_set(), "the writer was held: the break notice never reached the watcher"
        assert leases.notices >= 1
        assert not leases.intact(fd)
    finally:
        leases.close()
        os.close(fd)


def test_a_lease_broken_before_it_is_held_lets_the_writer_go(tmp_path, monkeypatch):
    """A writer opens the file in the instant between F_SETLEASE and the lease being recorded as
    held: its notice finds nothing to release. take() must look itself, or the writer waits for
    the watcher's next look (IDLE; an hour here)."""
    import fcntl

    from jam_core import fs

    monkeypatch.setattr(Leases, "IDLE", 3600.0)
    monkeypatch.setattr(Leases, "POLL", 3600.0)
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDONLY)
    opened = threading.Event()
    real = fcntl.fcntl
    writers = []

    def writer():
        w = os.open(path, os.O_WRONLY)  # blocks until jam releases the lease
        os.close(w)
        opened.set()

    def fcntl_then_writer(f, cmd, arg=0):
        out = real(f, cmd, arg)
        if f == fd and cmd == fs.F_SETLEASE and arg == fs.F_RDLCK and not writers:
            writers.append(threading.Thread(target=writer))
            writers[0].start()
            while real(fd, fs.F_GETLEASE) == fs.F_RDLCK:  # the kernel is breaking it now
                threading.Event().wait(0.001)
        return out

    leases = Leases()
    try:
        monkeypatch.setattr(fcntl, "fcntl", fcntl_then_writer)
        assert leases.take(fd)
        monkeypatch.setattr(fcntl, "fcntl", real)
        writers[0].join(timeout=30)
        assert opened.is_set(), "the writer was held: a break before the lease was recorded went unnoticed"
        assert not leases.intact(fd)
    finally:
        monkeypatch.setattr(fcntl, "fcntl", real)
        leases.close()
        os.close(fd)


def test_equal_content_stashed_twice_is_stored_once_and_both_check_out(tmp_path):
    t = make_tree(tmp_path)
    data = os.urandom(200_000)
    (t.root / "a").write_bytes(data)
    (t.root / "b").write_bytes(data)
    with Session() as s:
        assert len(stash(Root(t.root), ["."], make_plugin_manager(), s).done) == 2
    assert len(objects_verify(t.remote)) == 1
    with Session() as s:
        assert len(checkout(Root(t.root), ["."], make_plugin_manager(), s).done) == 2
    h = blake3.blake3(data).hexdigest()
    assert b3(t.root / "a") == h and b3(t.root / "b") == h

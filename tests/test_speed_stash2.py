"""Issue 13, second pass: fewer syscalls per file in stash and checkout, and the frees made
durable by the stash's last syncfs. Behaviour only, never time.

* a stash closes every original it removed (their blocks and inodes freed) before its last
  syncfs, so that syncfs writes the frees too (on ext4 without a journal, an inode freed in a
  block not yet written is passed over by every new file of its group for five minutes);
* one ``fstat`` per opened file (``fs.open_regular_stat``), the process's ids asked once
  (``fs.owner``, asked again in a forked child), and the dir backend's copy that reached the
  end of its source neither truncates nor stats it again: each check that remains still
  catches what it is for.
"""

from __future__ import annotations

import errno
import os

import pytest

import jam_core.fs as fs
import jam_core.ops.stash as stash_mod
from jam_core.errors import IntegrityError
from jam_core.fs import Closer, NotTheFile
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.ops.checkout import checkout
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, fingerprint, is_stub, make_tree, objects_verify


def _tree(tmp_path, n=3, size=100_000):
    t = make_tree(tmp_path)
    sums = {}
    for i in range(n):
        p = t.root / f"f{i}"
        make_file(p, size, seed=900 + i)
        sums[p.name] = b3(p)
    return t, sums


def test_a_stash_frees_its_originals_before_its_last_syncfs(tmp_path, monkeypatch):
    """The originals' last closes (their frees) come before the syncfs that ends the stash."""
    t, sums = _tree(tmp_path)
    events = []
    real_close, real_syncfs = os.close, stash_mod.syncfs

    def close(fd):
        events.append("close")
        real_close(fd)

    monkeypatch.setattr(Closer, "_close", staticmethod(close))
    monkeypatch.setattr(stash_mod, "syncfs", lambda fd: events.append("syncfs") or real_syncfs(fd))
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert len(res.done) == 3, res
    assert events.count("close") == 3, events
    assert events[-1] == "syncfs" and events.index("syncfs") < events.index("close"), events
    assert all(is_stub(t.root / n) for n in sums)
    with Session() as s:
        assert len(checkout(Root(t.root), ["."], make_plugin_manager(), s).done) == 3
    assert {n: b3(t.root / n) for n in sums} == sums


def test_open_regular_stat_refuses_what_open_regular_refuses(tmp_path):
    """The stat it returns is of what it opened; a FIFO, a symlink or another inode is refused
    and no descriptor is left open."""
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "f").write_bytes(b"x" * 10)
        expect = os.stat(tmp_path / "f")
        fd, st = fs.open_regular_stat(d, "f", expect=expect)
        try:
            assert (st.st_ino, st.st_size) == (expect.st_ino, 10) and os.fstat(fd).st_ino == st.st_ino
        finally:
            os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        os.mkfifo(tmp_path / "p")
        os.symlink("f", tmp_path / "l")
        (tmp_path / "g").write_bytes(b"y")
        with pytest.raises(NotTheFile):
            fs.open_regular_stat(d, "p")
        with pytest.raises(OSError) as exc:
            fs.open_regular_stat(d, "l")
        assert exc.value.errno == errno.ELOOP
        with pytest.raises(NotTheFile):
            fs.open_regular_stat(d, "g", expect=expect)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(d)


def test_the_ids_asked_once_are_asked_again_in_a_forked_child():
    """``owner()`` is cached for the process; a child (which may change its ids) asks again."""
    assert fs.owner() == (os.geteuid(), os.getegid())
    assert fs._OWNER
    pid = os.fork()
    if pid == 0:  # the child: nothing cached from the parent
        os._exit(0 if not fs._OWNER else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_stub_of_another_owner_keeps_its_owner_on_both_ways(tmp_path):
    """The cached ids still decide the fchown: a file of another user becomes a stub of that
    user and comes back as that user's file."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    t, sums = _tree(tmp_path, n=1)
    os.chown(t.root / "f0", 4321, 4322)
    with Session() as s:
        assert stash(Root(t.root), ["f0"], make_plugin_manager(), s).done
    st = os.stat(t.root / "f0")
    assert is_stub(t.root / "f0") and (st.st_uid, st.st_gid) == (4321, 4322)
    with Session() as s:
        assert checkout(Root(t.root), ["f0"], make_plugin_manager(), s).done
    st = os.stat(t.root / "f0")
    assert (st.st_uid, st.st_gid) == (4321, 4322) and b3(t.root / "f0") == sums["f0"]


# -- the dir backend's copy: no truncate or stat once the source was copied to its end -------------

def _fds(tmp_path, data: bytes, hole_at_end: int = 0):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    if hole_at_end:
        os.truncate(src, len(data) + hole_at_end)
    return os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


@pytest.mark.parametrize("hole_at_end", [0, 1 << 20])
def test_copy_to_the_end_skips_the_truncate_a_trailing_hole_still_gets_it(tmp_path, monkeypatch, hole_at_end):
    import jam_dir

    data = os.urandom(300_000)
    size = len(data) + hole_at_end
    sfd, dfd = _fds(tmp_path, data, hole_at_end)
    truncates = []
    real = os.ftruncate
    monkeypatch.setattr(jam_dir.os, "ftruncate", lambda fd, n: truncates.append(n) or real(fd, n))
    try:
        jam_dir._copy(sfd, dfd, size, lambda n: None)
    finally:
        os.close(sfd)
        os.close(dfd)
    monkeypatch.undo()
    assert os.path.getsize(tmp_path / "dst") == size
    assert b3(tmp_path / "dst") == b3(tmp_path / "src")
    assert truncates == ([size] if hole_at_end else []), truncates


def test_copy_of_a_source_that_ends_early_still_fails(tmp_path):
    """Skipping the last stat is only for a copy that reached ``size``: a source shorter than
    expected is still refused."""
    import jam_dir

    sfd, dfd = _fds(tmp_path, os.urandom(1000))
    try:
        with pytest.raises(IntegrityError):
            jam_dir._copy(sfd, dfd, 5000, lambda n: None)
    finally:
        os.close(sfd)
        os.close(dfd)


@pytest.mark.parametrize("hole_at_end", [0, 1 << 20])
def test_copy_hashing_truncates_only_for_a_trailing_hole(tmp_path, monkeypatch, hole_at_end):
    import jam_dir

    data = os.urandom(200_000 if not hole_at_end else 9 << 20)
    size = len(data) + hole_at_end
    sfd, dfd = _fds(tmp_path, data, hole_at_end)
    truncates = []
    real = os.ftruncate
    monkeypatch.setattr(jam_dir.os, "ftruncate", lambda fd, n: truncates.append(n) or real(fd, n))
    try:
        got, n = jam_dir._copy_hashing(sfd, dfd, size, "b3", lambda n: None)
    finally:
        os.close(sfd)
        os.close(dfd)
    monkeypatch.undo()
    assert n == size and got == f"b3:{b3(tmp_path / 'src')}" == f"b3:{b3(tmp_path / 'dst')}"
    assert truncates == ([size] if hole_at_end else []), truncates


def test_checkout_with_one_stat_still_refuses_a_stub_written_into(tmp_path):
    """``swap_in`` hands its one stat to ``verify_clean``: bytes written into the stub's hole
    with its size and mtime put back are still seen, and the stub is kept."""
    t, sums = _tree(tmp_path, n=1)
    with Session() as s:
        assert stash(Root(t.root), ["f0"], make_plugin_manager(), s).done
    p = t.root / "f0"
    st = os.stat(p)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(50_000)
        f.write(b"written into")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    fp = fingerprint(p)
    with Session() as s:
        res = checkout(Root(t.root), ["f0"], make_plugin_manager(), s)
    assert not res.done, res
    assert fingerprint(p) == fp
    assert len(objects_verify(t.remote)) == 1  # the stashed version, intact


# -- temporary names from a pool of random bytes, the pid asked once -------------------------------

def test_temporary_names_are_unique_and_a_forked_child_draws_its_own():
    """Names come from a pool read 4 KiB at a time: never one twice, and a forked child never
    draws the names its parent draws next (both would race for the same O_EXCL name)."""
    names = {fs.tmp_name() for _ in range(5000)}
    assert len(names) == 5000 and all(fs.is_jam_tmp(n) for n in names)
    fs.tmp_name(), fs.part_name()  # the parent's pool is not empty at the fork, its pid is known
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next names, and the pid its part names carry
        os.close(r)
        os.write(w, (" ".join(fs.tmp_name() for _ in range(3)) + "\n" + fs.part_name()).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child_names, child_part = f.read().split("\n")
    os.waitpid(pid, 0)
    mine = [fs.tmp_name() for _ in range(3)]
    assert set(child_names.split()).isdisjoint(mine), (child_names, mine)
    assert child_part.split(".")[1] == str(pid) and fs.part_name().split(".")[1] == str(os.getpid())


def test_a_stash_reads_a_small_file_once_and_a_file_grown_while_hashed_stays_local(tmp_path, monkeypatch):
    """The hash stops at the size the file had (no read to find its end); a file that grew
    meanwhile is caught by the stat after the hash and left local, with what was appended."""
    t, sums = _tree(tmp_path, n=2)
    reads = []
    real_readv = os.readv

    def readv(fd, bufs):
        n = real_readv(fd, bufs)
        reads.append(n)
        return n

    import jam_core.objects as objects

    monkeypatch.setattr(objects.os, "readv", readv)
    real_hash = stash_mod.hash_fd

    def hash_fd(fd, *a, **kw):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/f1"):
            with open(t.root / "f1", "ab") as f:  # a writer appends the instant before the hash
                f.write(b"appended while hashed")
        return real_hash(fd, *a, **kw)

    monkeypatch.setattr(stash_mod, "hash_fd", hash_fd)
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert [r for r, _ in res.done] == ["f0"], res
    assert res.skipped and res.skipped[0][0] == "f1", res
    assert reads == [100_000, 100_000], reads  # one read each, none past the size it had
    assert not is_stub(t.root / "f1") and (t.root / "f1").read_bytes().endswith(b"appended while hashed")
    objects_verify(t.remote)


def test_a_checkout_that_falls_back_to_a_second_remote_verifies_from_the_start(tmp_path):
    """The first remote's copy is corrupt: the temporary file is emptied and the second
    remote's copy is verified from its first byte (the failed verification had moved the
    descriptor's offset to the end)."""
    from jam_core.objects import object_relpath
    from jam_core.ops.remotes import add_remote

    t, sums = _tree(tmp_path, n=1)
    far = tmp_path / "far"
    far.mkdir()
    root = Root(t.root)
    add_remote(root, make_plugin_manager(), "far", str(far), tier=1)
    cfg = t.root / ".jam" / "config.toml"
    cfg.write_text(cfg.read_text() + "\n[place]\ncopies = 2\n")
    with Session() as s:
        res = stash(Root(t.root), ["f0"], make_plugin_manager(), s)
    assert res.done, res
    from tests.safety_support import record

    obj = t.remote / "objects" / object_relpath(record(t.root / "f0").oid)
    assert obj.is_file() and (far / "objects" / object_relpath(record(t.root / "f0").oid)).is_file()
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:  # the near copy: one byte flipped
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 1]))
    with Session() as s:
        res = checkout(Root(t.root), ["f0"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["f0"], res
    assert b3(t.root / "f0") == sums["f0"]


@pytest.mark.parametrize("held", [100, 1])
def test_originals_are_freed_at_the_end_or_once_too_many_after_the_next_batch_s_stubs(tmp_path, monkeypatch, held):
    """Batches of two. With room to hold them (``closes_held``), every original is handed to
    the closer once the last stub is swapped in: the frees would make each later creation of
    a stub scan past them. With room for one only, batch 1's go after batch 2's stubs are
    written aside and before its swaps (still overlapped with work), the last batch's at the
    end. Every original is closed before the stash returns."""
    import jam_core.ops.pipeline as pipeline

    t = make_tree(tmp_path)
    sums = {}
    for i in range(4):
        p = t.root / f"f{i}"
        make_file(p, 100_000, seed=950 + i)
        sums[p.name] = b3(p)
    events = []
    real_aside, real_hand, real_close = stash_mod.write_stub_aside, Closer.close_all, os.close
    real_swap = stash_mod._swap

    def aside(s):
        events.append(("stub", s.name))
        return real_aside(s)

    def hand(closer, fds):
        events.extend(("free", fd) for fd in fds)
        real_hand(closer, fds)

    closed = []
    monkeypatch.setattr(pipeline, "files_per_batch", lambda: 2)
    monkeypatch.setattr(pipeline, "closes_held", lambda: held)
    monkeypatch.setattr(stash_mod, "write_stub_aside", aside)
    monkeypatch.setattr(stash_mod, "_swap", lambda s, leases: events.append(("swap", s.name)) or real_swap(s, leases))
    monkeypatch.setattr(Closer, "close_all", hand)
    monkeypatch.setattr(Closer, "_close", staticmethod(lambda fd: closed.append(fd) or real_close(fd)))
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert len(res.done) == 4, res
    kinds = [k for k, _ in events]
    if held > 4:  # all at the end
        assert kinds == ["stub", "stub", "swap", "swap", "stub", "stub", "swap", "swap"] + ["free"] * 4, events
    else:  # batch 1's originals go while batch 2 is swapped in (overlapped), batch 2's at the end
        assert kinds == ["stub", "stub", "swap", "swap", "stub", "stub", "free", "free", "swap", "swap",
                         "free", "free"], events
    assert sorted(closed) == sorted(fd for k, fd in events if k == "free")
    assert all(is_stub(t.root / n) for n in sums)
    with Session() as s:
        assert len(checkout(Root(t.root), ["."], make_plugin_manager(), s).done) == 4
    assert {n: b3(t.root / n) for n in sums} == sums


def test_a_checkout_frees_the_old_stubs_once_its_last_file_is_in(tmp_path, monkeypatch):
    """Batches of two: the old stubs a checkout swapped out are closed (freed) only once every
    batch is in, not batch by batch (the frees would make each later creation scan past them
    on ext4 without a journal), and all before the checkout returns."""
    import jam_core.ops.checkout as checkout_mod
    import jam_core.ops.pipeline as pipeline

    t = make_tree(tmp_path)
    sums = {}
    for i in range(4):
        p = t.root / f"f{i}"
        make_file(p, 100_000, seed=960 + i)
        sums[p.name] = b3(p)
    with Session() as s:
        assert len(stash(Root(t.root), ["."], make_plugin_manager(), s).done) == 4
    events = []
    real_hand, real_swap = Closer.close_all, checkout_mod._swap_batch

    def hand(closer, fds):
        events.extend(("free", fd) for fd in fds)
        real_hand(closer, fds)

    monkeypatch.setattr(pipeline, "files_per_batch", lambda: 2)
    monkeypatch.setattr(Closer, "close_all", hand)
    monkeypatch.setattr(checkout_mod, "_swap_batch", lambda *a, **k: events.append(("swaps", 0)) or real_swap(*a, **k))
    with Session() as s:
        res = checkout(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert len(res.done) == 4, res
    assert [k for k, _ in events] == ["swaps", "swaps"] + ["free"] * 4, events
    assert {n: b3(t.root / n) for n in sums} == sums


def test_the_copy_buffer_is_reused_and_a_shorter_object_never_takes_the_last_one_s_bytes(tmp_path):
    """Small objects are copied through one buffer per thread (no 1 MiB zero-filled per
    object); a shorter object copied after a longer one holds its own bytes only, in its
    store and on the disk, and a sparse one its holes as zeros."""
    import jam_dir
    from jam_core.objects import read_buffer

    first = read_buffer(jam_dir._COPY_CHUNK)
    for i, (size, hole) in enumerate([(300_000, 0), (1000, 0), (5000, 4000)]):
        src, dst = tmp_path / f"s{i}", tmp_path / f"d{i}"
        src.write_bytes(os.urandom(size - hole))
        if hole:
            os.truncate(src, size)
        sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            got, n = jam_dir._copy_hashing(sfd, dfd, size, "b3", lambda n: None)
        finally:
            os.close(sfd)
            os.close(dfd)
        assert n == size and os.path.getsize(dst) == size
        assert got == f"b3:{b3(src)}" == f"b3:{b3(dst)}", i
    assert read_buffer(jam_dir._COPY_CHUNK) is first


def test_a_stash_interrupted_while_its_frees_are_waited_for_still_syncs_its_swaps(tmp_path, monkeypatch):
    """Ctrl-C while the stash waits for its originals' closes: the swaps already made are
    still made durable by the last syncfs, and the interruption goes on up."""
    t, sums = _tree(tmp_path, n=2)
    events = []
    real_stop, real_syncfs = Closer.stop, stash_mod.syncfs

    def stop(closer):
        real_stop(closer)
        events.append("stop")
        raise KeyboardInterrupt

    monkeypatch.setattr(Closer, "stop", stop)
    monkeypatch.setattr(stash_mod, "syncfs", lambda fd: events.append("syncfs") or real_syncfs(fd))
    with Session() as s, pytest.raises(KeyboardInterrupt):
        stash(Root(t.root), ["."], make_plugin_manager(), s)
    monkeypatch.undo()
    assert events[-2:] == ["stop", "syncfs"], events
    assert all(is_stub(t.root / n) for n in sums)

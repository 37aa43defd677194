"""Issue 13, third pass: the large copy hashed as it is copied, and the core's per-stub cost.
Behaviour only, never time.

* ``objects.hash_while_copying``: the dir backend's large copy (stash and fetch) runs in a
  worker thread while this thread hashes what is already final in the destination (read
  back from the destination itself, so the hash verifies the copy); a checkout then finds the
  fetched file verified (``objects.verified_copy``) and does not hash it a second time, unless
  it changed since or holds other bytes;
"""

from __future__ import annotations

import errno
import os

import pytest

import jam_core.objects as objects
import jam_core.ops.checkout as checkout_mod
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import hash_while_copying, verified_copy
from jam_core.ops.checkout import checkout
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, make_tree, record

BIG = 9 << 20  # over the dir backend's _BIG (8 MiB): copied in the kernel, hashed as it goes


def _copier(src: int, dst: int, size: int, step: int = 1 << 20, hole: tuple[int, int] | None = None):
    """A copy in steps of ``step`` bytes that reports each step (a hole left unwritten)."""
    def copy(report):
        off = 0
        while off < size:
            n = min(step, size - off)
            if hole is None or not (hole[0] <= off < hole[1]):
                os.pwrite(dst, os.pread(src, n, off), off)
            off += n
            report(off)
        os.ftruncate(dst, size)
        report(size)
    return copy


def test_hash_while_copying_hashes_the_destination_as_written(tmp_path):
    data = os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(12345)  # a hole in the middle
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        seen = []
        oid, n = hash_while_copying(dst, len(data), _copier(src, dst, len(data), hole=(3 << 20, 5 << 20)),
                                    progress=seen.append)
    finally:
        os.close(src)
    assert n == len(data) and sum(seen) == len(data)
    assert oid == "b3:" + b3(tmp_path / "src") and b3(tmp_path / "src") == b3(tmp_path / "dst")
    assert verified_copy(dst, oid, len(data))
    assert not verified_copy(dst, oid, len(data))  # one answer per copy
    os.close(dst)


def test_a_copy_that_fails_raises_and_leaves_nothing_verified(tmp_path):
    (tmp_path / "src").write_bytes(os.urandom(4 << 20))
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    inner = _copier(src, dst, 4 << 20)

    def failing(report):
        report(1 << 20)
        raise OSError(errno.ENOSPC, "no space left")

    try:
        with pytest.raises(OSError) as info:
            hash_while_copying(dst, 4 << 20, failing)
        assert info.value.errno == errno.ENOSPC
        oid, n = hash_while_copying(dst, 4 << 20, inner)  # the fd still works; then a write after it
        os.pwrite(dst, b"x", 10)
        os.utime(dst, ns=(0, 0))  # even a write that lands in the same clock tick changes ctime here
        assert not verified_copy(dst, oid, 4 << 20)
    finally:
        os.close(src)
        os.close(dst)


def test_a_destination_shorter_than_the_copy_said_is_not_verified(tmp_path):
    (tmp_path / "src").write_bytes(os.urandom(2 << 20))
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        oid, n = hash_while_copying(dst, 3 << 20, _copier(src, dst, 2 << 20))
        assert n == 2 << 20
        assert not verified_copy(dst, oid, 3 << 20)
    finally:
        os.close(src)
        os.close(dst)


def _big_tree(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=31)
    want = b3(t.root / "big")
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    return t, want


def test_a_large_checkout_reads_the_fetched_file_once(tmp_path, monkeypatch):
    """The dir backend hashed the copy as it wrote it: the core does not hash it again."""
    t, want = _big_tree(tmp_path)
    calls = []
    real = checkout_mod.hash_fd
    monkeypatch.setattr(checkout_mod, "hash_fd", lambda *a, **k: calls.append(1) or real(*a, **k))
    with Session() as s:
        res = checkout(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    assert b3(t.root / "big") == want
    assert calls == []


def test_a_corrupt_large_object_is_still_refused(tmp_path):
    """The copy hashed as it went holds other bytes than the stub's id: the core hashes it
    itself, finds it corrupt and leaves the stub."""
    t, want = _big_tree(tmp_path)
    obj = t.remote / "objects" / objects.object_relpath(record(t.root / "big").oid)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.seek(BIG - 7)
        b = f.read(1)
        f.seek(BIG - 7)
        f.write(bytes([b[0] ^ 1]))
    with Session() as s:
        res = checkout(Root(t.root), ["big"], make_plugin_manager(), s)
    assert not res.done and res.failed, res
    assert is_stub(t.root / "big")
    assert [n for n in os.listdir(t.root) if n != ".jam"] == ["big"]


def test_a_fetched_file_written_after_its_copy_is_hashed_again(tmp_path, monkeypatch):
    """Someone writes into the fetched file between the copy and the core's check: the
    remembered hash no longer counts, the core hashes it and refuses it."""
    import jam_dir

    t, want = _big_tree(tmp_path)
    real = jam_dir.hash_fd

    def then_write(dst, *a, **k):
        got = real(dst, *a, **k)
        if k.get("copy") is not None:
            os.pwrite(dst, b"\0garbage", 4096)
            os.utime(dst, ns=(1, 1))  # the same mtime tick would not show: the utime changes ctime
        return got

    monkeypatch.setattr(jam_dir, "hash_fd", then_write)
    with Session() as s:
        res = checkout(Root(t.root), ["big"], make_plugin_manager(), s)
    assert not res.done and res.failed, res
    assert is_stub(t.root / "big")


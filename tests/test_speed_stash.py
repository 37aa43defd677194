"""Issue 13, stash and checkout at the speed of the disk: behaviour only, never time.

The last close of a removed file frees its blocks (a wait on the device where the disk is
mounted with discard): stash and checkout hand those closes to ``fs.Closer``, which runs them
in the background, and neither command returns before every one is done."""

from __future__ import annotations

import os
import threading

import pytest

import jam_core.ops.checkout as checkout_mod
from jam_core.fs import Closer
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.ops.checkout import checkout
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, make_tree, objects_verify, on_another_disk


def _deleted_fds_under(top, deleted_only: bool = True) -> list[str]:
    """This process's descriptors that name a removed file (or any file) under ``top``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(top)) and (target.endswith(" (deleted)") or not deleted_only):
            out.append(target)
    return out


class _HeldCloses:
    """Holds every background close until ``Closer.stop`` is called: a command that returned
    without waiting for its closes leaves them undone, deterministically."""

    def __init__(self, monkeypatch):
        self.handed: list[int] = []
        self.closed: list[int] = []
        self.gate = threading.Event()
        real_close, real_stop, real_hand = os.close, Closer.stop, Closer.close_all

        def held_close(fd):
            self.gate.wait()
            real_close(fd)
            self.closed.append(fd)

        def hand(closer, fds):
            self.handed.extend(fds)
            real_hand(closer, fds)

        def stop(closer):
            self.gate.set()
            real_stop(closer)

        monkeypatch.setattr(Closer, "_close", staticmethod(held_close))
        monkeypatch.setattr(Closer, "close_all", hand)
        monkeypatch.setattr(Closer, "stop", stop)


def _tree(tmp_path, n=4, size=200_000):
    t = make_tree(tmp_path)
    (t.root / "d").mkdir()
    sums = {}
    for i in range(n):
        p = t.root / "d" / f"f{i}"
        make_file(p, size, seed=700 + i)
        sums[p.name] = b3(p)
    return t, sums


def test_a_stash_returns_only_once_every_original_is_closed(tmp_path, monkeypatch):
    """Each stashed original is closed (its blocks freed) in the background, and the stash
    waits for all of them: none is left open, removed, when it returns."""
    t, sums = _tree(tmp_path)
    held = _HeldCloses(monkeypatch)
    with Session() as s:
        res = stash(Root(t.root), ["d"], make_plugin_manager(), s)
    assert len(res.done) == 4, res
    assert len(held.handed) == 4, "the originals were not closed in the background"
    assert sorted(held.closed) == sorted(held.handed), "the stash returned before its closes were done"
    assert not _deleted_fds_under(t.root)
    assert all(is_stub(t.root / "d" / n) for n in sums)
    assert len(objects_verify(t.remote)) == 4


def test_a_checkout_returns_only_once_every_old_stub_is_closed(tmp_path, monkeypatch):
    """Each stub a checkout replaces is removed while still open and closed in the background;
    the checkout waits for those closes, and every file holds its content."""
    t, sums = _tree(tmp_path)
    with Session() as s:
        assert len(stash(Root(t.root), ["d"], make_plugin_manager(), s).done) == 4
    held = _HeldCloses(monkeypatch)
    with Session() as s:
        res = checkout(Root(t.root), ["d"], make_plugin_manager(), s)
    assert len(res.done) == 4, res
    assert len(held.handed) == 4, "the old stubs were not closed in the background"
    assert sorted(held.closed) == sorted(held.handed), "the checkout returned before its closes were done"
    assert not _deleted_fds_under(t.root)
    for n, digest in sums.items():
        assert b3(t.root / "d" / n) == digest and not is_stub(t.root / "d" / n)


def test_an_interrupted_checkout_closes_the_stubs_it_replaced(tmp_path, monkeypatch):
    """Interrupted after one swap: the stub it replaced is closed, the rest stay stubs, and no
    temporary file or removed file stays open or on the disk."""
    t, sums = _tree(tmp_path)
    with Session() as s:
        assert len(stash(Root(t.root), ["d"], make_plugin_manager(), s).done) == 4
    real, calls = checkout_mod.swap_in, []

    def swap_then_interrupt(w):
        calls.append(w.entry.rel)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(w)

    monkeypatch.setattr(checkout_mod, "swap_in", swap_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with Session() as s:
            checkout(Root(t.root), ["d"], make_plugin_manager(), s)
    monkeypatch.undo()
    assert not _deleted_fds_under(t.root)
    assert not [n for n in os.listdir(t.root / "d") if n.startswith(".jam-")]
    first = t.root / calls[0]
    assert b3(first) == sums[first.name] and not is_stub(first)
    assert sum(is_stub(t.root / "d" / n) for n in sums) == 3


def test_a_failed_swap_in_closes_the_stub_it_held(tmp_path, monkeypatch):
    """The stub is held open through the exchange; when the swap is refused (the stub was
    replaced at the last instant) it is closed at once and left where it is."""
    t, sums = _tree(tmp_path, n=1)
    with Session() as s:
        assert len(stash(Root(t.root), ["d"], make_plugin_manager(), s).done) == 1
    victim = t.root / "d" / "f0"
    real_restore = checkout_mod._restore_metadata

    def replace_then_restore(w, stub_fd):
        real_restore(w, stub_fd)
        os.rename(victim, t.root / "d" / "moved-stub")
        victim.write_bytes(b"saved at the last instant")

    monkeypatch.setattr(checkout_mod, "_restore_metadata", replace_then_restore)
    with Session() as s:
        res = checkout(Root(t.root), ["d/f0"], make_plugin_manager(), s)
    monkeypatch.undo()
    assert not res.done and res.failed, res
    assert victim.read_bytes() == b"saved at the last instant"
    assert is_stub(t.root / "d" / "moved-stub")
    assert not _deleted_fds_under(t.root, deleted_only=False), "the stub held for the swap was left open"
    assert not [n for n in os.listdir(t.root / "d") if n.startswith(".jam-")]


def test_closer_wait_returns_only_after_its_closes(tmp_path, monkeypatch):
    """``Closer.wait`` does not return while a close handed to it is still running."""
    gate, closed = threading.Event(), []
    real_close = os.close

    def held_close(fd):
        gate.wait()
        real_close(fd)
        closed.append(fd)

    monkeypatch.setattr(Closer, "_close", staticmethod(held_close))
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(Closer.THREADS + 3)]
    c = Closer()
    for fd in fds:
        c.close(fd)
    waiter = threading.Thread(target=c.wait)
    waiter.start()
    waiter.join(0.2)
    still_waiting = waiter.is_alive()
    gate.set()
    waiter.join()
    c.stop()
    assert still_waiting, "wait() returned with closes still held"
    assert sorted(closed) == sorted(fds)
    assert len(c._threads) == 0


def test_a_large_sparse_file_is_copied_in_the_kernel_holes_kept_and_verified(tmp_path, monkeypatch):
    """A large object is copied by copy_file_range (not read, hashed and written in Python),
    keeps its holes on the remote, and verifies; it checks out identical."""
    import jam_dir

    on_another_disk(monkeypatch)
    t = make_tree(tmp_path)
    p = t.root / "sparse.img"
    with open(p, "wb") as f:
        f.truncate(24 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))
        f.seek(17 << 20)
        f.write(os.urandom(2 << 20))
    digest = b3(p)
    copied = []
    real = os.copy_file_range

    def counting(src, dst, count, offset_src=None, offset_dst=None):
        n = real(src, dst, count, offset_src, offset_dst)
        copied.append(n)
        return n

    monkeypatch.setattr(jam_dir.os, "copy_file_range", counting)
    monkeypatch.setattr(jam_dir, "_copy_hashing", None)  # never the Python read-hash-write loop
    with Session() as s:
        res = stash(Root(t.root), ["sparse.img"], make_plugin_manager(), s)
    assert len(res.done) == 1, res
    assert sum(copied) == 5 << 20, "only the data extents are copied"
    (obj,) = objects_verify(t.remote)
    assert obj.name == digest and os.stat(obj).st_blocks * 512 < 8 << 20, "the object lost its holes"
    monkeypatch.undo()
    with Session() as s:
        assert len(checkout(Root(t.root), ["sparse.img"], make_plugin_manager(), s).done) == 1
    assert b3(p) == digest and not is_stub(p)

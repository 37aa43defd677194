"""Issue 13, a third attacker's review of the newest speed code (R5): the directory descriptors
closed past the budget and reopened by name (``fs.DirFds``), the shared scan's opened-up lone
directory (``scan.scan_shared``), the catalog's stamps, the SFTP batches sealed outside
paramiko's Packetizer and the hooks' fallback run from ``/``. Real files, real xattrs, a real
sshd, the real `jam`; faults are injected at the exact instant (a wrapper around the function
that runs then), never by sleeping, and nothing is timed.

Holes found, fixed since (each test failed before its fix: ``DirFds.still_there`` checked right
before the stash's and the checkout's swaps, ``checkout._wants`` failing a directory's files alone):

* ``DirFds.get`` reopens a directory closed past the budget from the nearest ancestor it kept
  open; a kept descriptor follows its directory when it is moved, so an ancestor moved out of the
  root leads the stash (a stub, the user's file unlinked) and the checkout (a restored file)
  outside the root;
* more generally no kept directory descriptor is checked against the root before the swaps: a
  directory moved out of the root between two batches, or between a checkout's fetch and its
  swap (a symlink to it in its place), gets stubs or restored files out there (a stub outside
  every root: nothing refers to its object, gc may remove it);
* ``checkout._wants`` lets one directory that cannot be opened (swapped for a symlink, removed)
  end the whole checkout (the stash fails only that directory's files).

Guards checked (each test fails with its guard removed, in a scratch copy of the code):

* ``fs.open_dir``'s O_NOFOLLOW: a directory swapped for a symlink before its reopen is not
  followed by the stash;
* ``scan._scan_from``'s lstat and O_NOFOLLOW open of a unit: a unit of an opened-up lone
  directory swapped for a symlink (inside or outside the root) is not walked by either process;
* ``connect.send_data``'s wait for ``clear_to_send`` under ``clear_to_send_lock``: a batch whose
  window was taken as a key exchange began is sealed with the new keys, not between NEWKEYS and
  the switch;
* ``connect.send_data``'s packetizer write lock: a message paramiko's own thread sends while a
  batch is sealed waits for it (no shared sequence number or nonce).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.safety_support import JAM, b3, is_stub, jam, make_tree

OLD = 1_500_000_000


def _write(path: Path, data: bytes, old: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, (OLD, OLD))


# -- 1. DirFds: a directory closed past the budget, reopened later by name -----------------------

# Nine files in the order the stash (and the checkout) is asked for them: with a budget of two
# descriptors (two files a batch), "a/b" is closed past the budget while "a" stays open, and the
# last file's batch reopens "a/b" from the descriptor of "a" it kept.
ORDER = ["a/b/f1", "a/f0", "x/g", "a/f00", "y/h", "z/i", "a/f01", "w/j", "a/b/f2"]


def _small_budget(monkeypatch, n: int = 2) -> None:
    import jam_core.fs as fs

    monkeypatch.setattr(fs, "fd_budget", lambda: n)


def _at_reopen(monkeypatch, module, target: str, ancestor: str, action) -> list:
    """Run ``action()`` once, the instant the operation (after its walk of the named paths,
    ``module.collect``) asks ``DirFds`` for ``target`` while it is closed and ``ancestor`` is
    open: the reopen by name from that ancestor. Returns a list that holds 1 once it ran."""
    import jam_core.fs as fs

    real_get, real_collect = fs.DirFds.get, module.collect
    ran, phase = [], []

    def collect(*args, **kwargs):
        out = real_collect(*args, **kwargs)
        phase.append(1)
        return out

    def get(self, rel_dir):
        if phase and not ran and rel_dir == target and target not in self._fds and ancestor in self._fds:
            ran.append(1)
            action()
        return real_get(self, rel_dir)

    monkeypatch.setattr(module, "collect", collect)
    monkeypatch.setattr(fs.DirFds, "get", get)
    return ran


def _files(root: Path) -> dict[str, str]:
    out = {}
    for rel in ORDER:
        _write(root / rel, random.Random(rel).randbytes(5000))
        out[rel] = b3(root / rel)
    return out


def _run(op: str, root: Path, rels: list[str]):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.checkout import checkout
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    with Session() as s:
        return (stash if op == "stash" else checkout)(Root(root), rels, make_plugin_manager(), s)


def _f2_untouched_outside(outside: Path, stub: bool, digest: str) -> None:
    """``a/b/f2``, moved out of the root, is as the user left it, and jam left no temporary
    file out there."""
    f2 = outside / "a" / "b" / "f2"
    assert (is_stub(f2), b3(f2)) == (stub, digest), "jam wrote a/b/f2 outside the root"
    assert not [p.name for p in outside.rglob(".jam-*")], "jam left a temporary file outside the root"


def _ancestor_moved_out(t, outside: Path):
    """Move ``a`` (with ``a/b`` and the file ``a/b/f2`` in it) out of the root, to ``outside``,
    and put a fresh empty ``a/b`` in its place."""

    def move():
        os.rename(t.root / "a", outside / "a")
        (t.root / "a" / "b").mkdir(parents=True)

    return move


def test_a_stash_never_writes_through_an_ancestor_moved_out_of_the_root(tmp_path, monkeypatch):
    """``a/b`` was closed past the budget, ``a`` kept open; the user moves ``a`` out of the
    root (same filesystem) and makes a new ``a/b``. The reopen of ``a/b`` by name from the
    kept ``a`` lands outside the root: nothing may be written there (invariant 7), no stub, no
    temporary file, the user's file left whole."""
    t = make_tree(tmp_path)
    _files(t.root)
    outside = tmp_path / "outside"
    outside.mkdir()
    _small_budget(monkeypatch)
    import jam_core.ops.stash as stash_mod

    ran = _at_reopen(monkeypatch, stash_mod, "a/b", "a", _ancestor_moved_out(t, outside))
    want_f2 = b3(t.root / "a/b/f2")
    res = _run("stash", t.root, ORDER)
    assert ran == [1]
    _f2_untouched_outside(outside, False, want_f2)
    assert "a/b/f2" not in [r for r, _ in res.done]


def test_a_checkout_never_writes_through_an_ancestor_moved_out_of_the_root(tmp_path, monkeypatch):
    t = make_tree(tmp_path)
    _files(t.root)
    assert not _run("stash", t.root, ORDER).failed
    stub_f2 = b3(t.root / "a/b/f2")
    outside = tmp_path / "outside"
    outside.mkdir()
    _small_budget(monkeypatch)
    import jam_core.ops.checkout as checkout_mod

    ran = _at_reopen(monkeypatch, checkout_mod, "a/b", "a", _ancestor_moved_out(t, outside))
    res = _run("checkout", t.root, ORDER)
    assert ran == [1]
    _f2_untouched_outside(outside, True, stub_f2)
    assert "a/b/f2" not in [r for r, _ in res.done]


def test_a_stash_never_writes_into_a_kept_directory_moved_out_of_the_root(tmp_path, monkeypatch):
    """Two batches in ``a/b`` (a budget of two: two files a batch); ``a/b`` stays open from
    the first. The instant the second batch asks for it, the user moves ``a`` out of the root.
    The kept descriptor now leads outside: the files out there must stay as they are (a stub
    out there is in no root: nothing refers to its object, and gc may remove it)."""
    t = make_tree(tmp_path)
    rels = [f"a/b/f{i}" for i in range(1, 5)]
    for r in rels:
        _write(t.root / r, random.Random(r).randbytes(5000))
    want = {r: b3(t.root / r) for r in rels}
    outside = tmp_path / "outside"
    outside.mkdir()
    _small_budget(monkeypatch)
    import jam_core.fs as fs

    real_hold, holds = fs.DirFds.hold, []

    def hold(self, rel_dir):
        holds.append(rel_dir)
        if len(holds) == 3:  # the second batch's first file
            os.rename(t.root / "a", outside / "a")
        return real_hold(self, rel_dir)

    monkeypatch.setattr(fs.DirFds, "hold", hold)
    res = _run("stash", t.root, rels)
    assert len(holds) == 4
    for r in rels:  # (the first batch is swapped once the second is prepared: after the move too)
        assert (is_stub(outside / r), b3(outside / r)) == (False, want[r]), f"jam stubbed {r} outside the root"
    assert not res.done, res


def test_a_checkout_never_restores_into_a_directory_moved_out_of_the_root_before_its_swap(tmp_path, monkeypatch):
    """One batch, no budget: ``a/b`` is held open from the temporary files' creation to the
    swaps. The instant the batch's swaps begin, ``a/b`` is moved out of the root and a symlink
    to it put in its place: the stub out there stays a stub, its file fails."""
    t = make_tree(tmp_path)
    rels = [f"a/b/f{i}" for i in range(1, 4)]
    for r in rels:
        _write(t.root / r, random.Random(r).randbytes(5000))
    assert not _run("stash", t.root, rels).failed
    outside = tmp_path / "outside"
    outside.mkdir()
    import jam_core.ops.checkout as checkout_mod

    real, ran = checkout_mod._swap_batch, []

    def swap_batch(ready, *a, **kw):
        if ready and not ran:
            ran.append(1)
            os.rename(t.root / "a" / "b", outside / "b")
            os.symlink(outside / "b", t.root / "a" / "b")
        return real(ready, *a, **kw)

    monkeypatch.setattr(checkout_mod, "_swap_batch", swap_batch)
    res = _run("checkout", t.root, rels)
    assert ran == [1]
    assert [n for n in sorted(os.listdir(outside / "b")) if not is_stub(outside / "b" / n)] == [], \
        "jam restored files outside the root"
    assert sorted(r for r, _ in res.failed) == rels, res


def _swapped_for_symlink(t, outside: Path):
    """Move ``a/b`` out of the root and put a symlink to it in its place."""

    def swap():
        os.rename(t.root / "a" / "b", outside / "b")
        os.symlink(outside / "b", t.root / "a" / "b")

    return swap


def test_a_stash_never_follows_a_directory_swapped_for_a_symlink_before_its_reopen(tmp_path, monkeypatch):
    """``a/b`` closed past the budget is swapped for a symlink to a directory outside the root
    the instant before the stash reopens it: ``a/b/f2`` out there stays as it is, the stash says
    why it was not done, the other files are stashed (guard: ``fs.open_dir``'s O_NOFOLLOW, one
    component at a time)."""
    t = make_tree(tmp_path)
    _files(t.root)
    _write(t.root / "v/k", b"k" * 5000)
    outside = tmp_path / "outside"
    outside.mkdir()
    _small_budget(monkeypatch)
    import jam_core.ops.stash as stash_mod

    ran = _at_reopen(monkeypatch, stash_mod, "a/b", "a", _swapped_for_symlink(t, outside))
    want_f2 = b3(t.root / "a/b/f2")
    res = _run("stash", t.root, ORDER + ["v/k"])
    assert ran == [1]
    f2 = outside / "b" / "f2"
    assert (is_stub(f2), b3(f2)) == (False, want_f2)
    assert not [p.name for p in outside.rglob(".jam-*")]
    assert [r for r, _ in res.failed] == ["a/b/f2"], res
    assert sorted(r for r, _ in res.done) == sorted(r for r in ORDER + ["v/k"] if r != "a/b/f2")


def test_a_checkout_past_a_directory_swapped_for_a_symlink_does_the_other_files(tmp_path, monkeypatch):
    """The same swap before the checkout reopens ``a/b``: the stub out there stays a stub, and
    only its file fails; the others, ``v/k`` in the same batch and later ones, come back (the
    stash already treats one unopenable directory as its files' failure)."""
    t = make_tree(tmp_path)
    files = _files(t.root)
    _write(t.root / "v/k", b"k" * 5000)
    _write(t.root / "v/l", b"l" * 5000)
    rels = ORDER + ["v/k", "v/l"]
    assert not _run("stash", t.root, rels).failed
    outside = tmp_path / "outside"
    outside.mkdir()
    _small_budget(monkeypatch)
    import jam_core.ops.checkout as checkout_mod

    ran = _at_reopen(monkeypatch, checkout_mod, "a/b", "a", _swapped_for_symlink(t, outside))
    try:
        res = _run("checkout", t.root, rels)
    finally:
        assert ran == [1]
        assert is_stub(outside / "b" / "f2")
        assert not [p.name for p in outside.rglob(".jam-*")]
    assert [r for r, _ in res.failed] == ["a/b/f2"], res
    assert not is_stub(t.root / "v/k") and not is_stub(t.root / "v/l")
    assert all(b3(t.root / r) == d for r, d in files.items() if r != "a/b/f2")


# -- 2. scan_shared: a lone directory opened up, its subdirectories shared ------------------------


def _opened_up_tree(root: Path) -> None:
    """Everything under the lone ``home`` (opened up: its subdirectories are the units shared
    with the helper): three directories of three old files each."""
    for d in ("d1", "d2", "d3"):
        for i in range(3):
            _write(root / "home" / d / f"f{i}", random.Random(f"{d}{i}").randbytes(70_000))


def _force_shared(monkeypatch, when_unit: str, action) -> None:
    """The shared walk forced (a threshold of 0, one thread); ``action()`` runs once, in
    whichever process takes the unit ``when_unit``, just before it walks it."""
    import jam_core.scan as scan_mod

    real = scan_mod._walk_unit
    monkeypatch.setattr(scan_mod, "SHARE_AFTER", 0)
    monkeypatch.setattr(scan_mod, "_threads", lambda: 1)
    forks = []
    real_shared = scan_mod._shared

    def shared(*a, **kw):
        forks.append(a[1])
        return real_shared(*a, **kw)

    def walk_unit(root_fd, unit, *a, **kw):
        if unit == when_unit:
            action()
        return real(root_fd, unit, *a, **kw)

    monkeypatch.setattr(scan_mod, "_walk_unit", walk_unit)
    monkeypatch.setattr(scan_mod, "_shared", shared)
    return forks


@pytest.mark.parametrize("to", ["inside", "outside"])
def test_an_opened_up_unit_swapped_for_a_symlink_before_its_walk_is_not_followed(tmp_path, monkeypatch, to):
    """``home/d2``, one of the units the lone ``home`` was opened up into, is moved out of the
    root and a symlink put in its place (to its sibling ``home/d1``: counted twice if followed;
    to where it went: outside the root) just before its walk, in the parent or the helper: the
    plan names the files of d1 and d3 once each, and nothing from d2 (guard: ``_scan_from``'s
    lstat of a unit, a symlink is not a directory, and its O_NOFOLLOW open)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.policy.plan import plan_auto
    from jam_core.root import Root

    t = make_tree(tmp_path)
    cfg = t.root / ".jam" / "config.toml"
    cfg.write_text(cfg.read_text() + '\n[policy.age]\nolder_than = "1d"\n')
    _opened_up_tree(t.root)
    away = tmp_path / "away"

    def swap():
        os.rename(t.root / "home" / "d2", away)
        os.symlink(t.root / "home" / "d1" if to == "inside" else away, t.root / "home" / "d2")

    forks = _force_shared(monkeypatch, "home/d2", swap)
    plan = plan_auto(Root(t.root), make_plugin_manager()).to_json()
    assert [sorted(f) for f in forks] == [["home/d1", "home/d2", "home/d3"]], forks
    assert os.path.islink(t.root / "home" / "d2")
    got = [f["path"] for f in plan["files"]]
    assert sorted(got) == [f"home/{d}/f{i}" for d in ("d1", "d3") for i in range(3)], got


# -- 4. connect.send_data: batches sealed outside paramiko's Packetizer ---------------------------


def _sftp_round(server, store: Path, src: Path, connections: int):
    """Stash ``src`` on an sftp remote of ``server``; returns (stashed, oid, the server's hash
    of the object it now holds under that id)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.objects import hash_file, object_relpath
    from tests.conftest_sshd import sftp_remote_for

    (store / "objects").mkdir(exist_ok=True)
    (store / "tmp").mkdir(exist_ok=True)
    remote = sftp_remote_for(f"sftp://{server.alias}{store}", connections=connections)
    oid, size = hash_file(src)
    with Session() as s:
        ok = make_plugin_manager(load_entrypoints=False).hook.stash(remote=remote, oid=oid, source=src, size=size,
                                                                    session=s)
    there = store / "objects" / object_relpath(oid)
    return ok, oid, (hash_file(there)[0] if there.exists() else None)


class _Watched:
    """A transport's ``clear_to_send`` event, shared with a test: the sending thread's first
    wait for it returns only once the exchange's NEWKEYS is out (``newkeys``); its next wait
    (it found the keys not ready and looks again) sets ``went_on``."""

    def __init__(self, event, newkeys, went_on):
        self.event, self.newkeys, self.went_on = event, newkeys, went_on
        self.sender = threading.get_ident()
        self.waits = 0

    def set(self):
        self.event.set()

    def clear(self):
        self.event.clear()

    def is_set(self):
        return self.event.is_set()

    def wait(self, timeout=None):
        if threading.get_ident() == self.sender:
            self.waits += 1
            if self.waits == 1:
                assert self.newkeys.wait(60), "the exchange never reached NEWKEYS"
            else:
                self.went_on.set()
        return self.event.wait(timeout)


def test_a_key_exchange_begun_between_a_batchs_window_and_its_sealing_is_waited_for(
        sshd, tmp_path, tmp_path_factory, monkeypatch):
    """The instant ``send_data`` has taken a batch's window (``_wait_for_send_window``, under the
    channel's lock) and before it seals, this side begins a key exchange (its KEXINIT goes out);
    the batch is held until this side's NEWKEYS is out and its new keys not yet in use (paramiko
    sends NEWKEYS, then switches keys, outside the packetizer's write lock). The batch must wait
    for the new keys: one sealed then with the old ones arrives after NEWKEYS and the server
    drops the connection. The upload succeeds and the server holds the object's bytes (guard:
    ``send_data``'s wait until ``clear_to_send`` is set, under ``clear_to_send_lock``)."""
    import paramiko

    newkeys, went_on = threading.Event(), threading.Event()  # went on: waited again, or sealed
    begun, calls = [], []
    real_window = paramiko.Channel._wait_for_send_window
    real_set_out = paramiko.Packetizer.set_outbound_cipher
    real_write = paramiko.Packetizer.write_all

    def window(self, size):
        n = real_window(self, size)
        if sys._getframe(1).f_code.co_name == "send_data" and n > 0:
            calls.append(n)
            if len(calls) == 10 and not begun:
                begun.append(1)
                t = self.transport
                t.clear_to_send = _Watched(t.clear_to_send, newkeys, went_on)
                t._send_kex_init()  # what renegotiate_keys starts with; the exchange goes on in its reader
        return n

    def set_outbound_cipher(self, *a, **kw):
        if begun and not newkeys.is_set():  # NEWKEYS is out, the new keys not yet in use
            newkeys.set()
            assert went_on.wait(60), "the sender never went on"
        return real_set_out(self, *a, **kw)

    def write_all(self, out):
        if newkeys.is_set() and sys._getframe(1).f_code.co_name == "send_data":
            went_on.set()
        return real_write(self, out)

    monkeypatch.setattr(paramiko.Channel, "_wait_for_send_window", window)
    monkeypatch.setattr(paramiko.Packetizer, "set_outbound_cipher", set_outbound_cipher)
    monkeypatch.setattr(paramiko.Packetizer, "write_all", write_all)
    src = tmp_path / "big.bin"
    from tests.conftest import make_file

    make_file(src, (3 << 20) + 4567, seed=8)
    ok, oid, there = _sftp_round(sshd, tmp_path_factory.mktemp("store"), src, 1)
    assert begun == [1] and newkeys.is_set()
    assert ok is True and there == oid


class _WatchedLock:
    """A packetizer's write lock, shared with a test: ``tried`` is set when a thread other
    than ``sender`` asks for it (before it may have to wait)."""

    def __init__(self, lock, sender: int, tried):
        self.lock, self.sender, self.tried = lock, sender, tried

    def acquire(self, *a, **kw):
        if threading.get_ident() != self.sender:
            self.tried.set()
        return self.lock.acquire(*a, **kw)

    def release(self):
        return self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def test_a_message_paramiko_sends_on_its_own_while_a_batch_is_sealed_waits_for_the_batch(
        sshd, tmp_path, tmp_path_factory, monkeypatch):
    """paramiko's reader thread answers some messages itself with ``Transport._send_message``
    (a keepalive's global request, a key exchange), under the packetizer's write lock alone.
    The instant a batch is being sealed (its sequence number and nonce read, its padding being
    drawn), another thread sends such a message: it must wait for the batch, or both use the
    same sequence number and nonce and the server drops the connection. The upload succeeds and
    the server holds the object's bytes (guard: ``send_data`` seals and writes under
    ``Packetizer``'s write lock)."""
    import paramiko
    from paramiko.common import cMSG_IGNORE

    from jam_sftp import connect

    tried, sent = threading.Event(), threading.Event()
    draws = []
    real_urandom = connect.os.urandom

    def urandom(n):
        if sys._getframe(1).f_code.co_name == "send_data":
            draws.append(n)
            if len(draws) == 40:  # a batch being sealed, well into the upload
                t = sys._getframe(1).f_locals["t"]
                p = t.packetizer
                p.__dict__[connect._P + "write_lock"] = _WatchedLock(p.__dict__[connect._P + "write_lock"],
                                                                    threading.get_ident(), tried)
                m = paramiko.Message()
                m.add_byte(cMSG_IGNORE)
                m.add_string(b"another thread's message")
                threading.Thread(target=lambda: (t._send_message(m), sent.set()), daemon=True).start()
                assert tried.wait(60), "the other thread never asked for the write lock"
        return real_urandom(n)

    monkeypatch.setattr(connect.os, "urandom", urandom)
    src = tmp_path / "big.bin"
    from tests.conftest import make_file

    make_file(src, (3 << 20) + 4567, seed=9)
    ok, oid, there = _sftp_round(sshd, tmp_path_factory.mktemp("store"), src, 1)
    assert len(draws) > 40 and tried.is_set()
    assert ok is True and there == oid
    assert sent.wait(60)

"""The swaps and walks of issue 8, each fault injected at its exact instant on real files:

* a writer holding the file open, or opening it during the stash (read leases, invariant 11);
* a file saved over the original, or over a stub, between the last check and the swap
  (renameat2 exchanges checked after, invariant 11);
* a directory swapped for a symlink in the middle of a walk, or between the scan and the hash
  (dir-fd walks, invariant 10);
* a FIFO swapped in after the scan (O_NONBLOCK | O_NOFOLLOW and fstat);
* ``place`` answering with a modified copy of a remote (invariant 1, matched by name);
* POSIX ACLs, an unwritable directory in a batch, ``checkout --keep-both``, non-regular files
  named on the command line.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

from jam_core import hookimpl
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import object_relpath
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, jam, listing, make_tree, record


def _stash(t, rels, pm=None):
    from jam_core.ops.stash import stash

    with Session() as s:
        return stash(Root(t.root), rels, pm or make_plugin_manager(), s)


def _checkout(t, rels, pm=None, **kw):
    from jam_core.ops.checkout import checkout

    with Session() as s:
        return checkout(Root(t.root), rels, pm or make_plugin_manager(), s, **kw)


def _tmp_names(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith(".jam-")]


# -- leases: a file open for writing is never stashed ------------------------------------------

def test_file_held_open_for_writing_by_another_program_stays_local(tmp_path):
    """A logger keeps its file open: after a stash it would write into the unlinked original."""
    t = make_tree(tmp_path)
    make_file(t.root / "app.log", 200_000, seed=1)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); print('open', flush=True); "
         "sys.stdin.readline(); f.write(b'still logging'); f.close()", str(t.root / "app.log")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"open\n"
        res = jam("stash", "app.log", cwd=t.root, check=1)
        assert "open for writing" in res.err, res.err
    finally:
        writer.communicate(b"go\n")
    assert not is_stub(t.root / "app.log")
    assert (t.root / "app.log").read_bytes().endswith(b"still logging")
    assert _tmp_names(t.root) == []


class OpenForWritingDuringStore:
    """A program opens the file for writing while jam stores it, and writes only after jam is
    done: size, mtime and ctime do not move before the swap, only the lease can tell."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    @hookimpl(tryfirst=True)
    def stash(self):
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return None


def test_file_opened_for_writing_during_the_stash_stays_local(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "f", 300_000, seed=2)
    spy = OpenForWritingDuringStore(t.root / "f")
    res = _stash(t, ["f"], make_plugin_manager(extra=(spy,)))
    assert spy.fd is not None
    os.write(spy.fd, b"written through a descriptor opened during the stash")
    os.close(spy.fd)
    assert not res.done and res.exit_code == 1, res
    assert not is_stub(t.root / "f")
    assert (t.root / "f").read_bytes().endswith(b"written through a descriptor opened during the stash")
    assert _tmp_names(t.root) == []


# -- exchanges: a save in the last instant is never overwritten ---------------------------------

def _editor_save(path: Path, data: bytes) -> None:
    """How editors save: write a new file beside it, rename it over the original."""
    new = path.with_name(path.name + ".swp")
    new.write_bytes(data)
    os.rename(new, path)


def test_save_over_the_original_in_the_last_instant_is_kept(tmp_path, monkeypatch):
    """The save lands after every check of the swap, just before the exchange itself."""
    import jam_core.ops.stash as stash_mod

    t = make_tree(tmp_path)
    make_file(t.root / "doc.txt", 300_000, seed=3)
    real = stash_mod.exchange
    saved = []

    def save_then_exchange(dir_fd, a, b):
        if b == "doc.txt" and not saved:
            saved.append(b)
            _editor_save(t.root / "doc.txt", b"the user's last save")
        real(dir_fd, a, b)

    monkeypatch.setattr(stash_mod, "exchange", save_then_exchange)
    res = _stash(t, ["doc.txt"])
    monkeypatch.undo()
    assert saved and not res.done, res
    assert not is_stub(t.root / "doc.txt")
    assert (t.root / "doc.txt").read_bytes() == b"the user's last save"
    assert _tmp_names(t.root) == []


def test_write_in_the_last_instant_before_the_exchange_is_kept(tmp_path, monkeypatch):
    """A write into the original itself just before the exchange (it breaks the lease)."""
    import jam_core.ops.stash as stash_mod

    t = make_tree(tmp_path)
    make_file(t.root / "f", 300_000, seed=8)
    real = stash_mod.exchange
    hits = []

    def write_then_exchange(dir_fd, a, b):
        if b == "f" and not hits:
            hits.append(b)
            with open(t.root / "f", "ab") as f:
                f.write(b"last instant")
        real(dir_fd, a, b)

    monkeypatch.setattr(stash_mod, "exchange", write_then_exchange)
    res = _stash(t, ["f"])
    monkeypatch.undo()
    assert hits and not res.done
    assert not is_stub(t.root / "f") and (t.root / "f").read_bytes().endswith(b"last instant")
    assert _tmp_names(t.root) == []


def test_save_over_a_stub_being_checked_out_is_kept(tmp_path, monkeypatch):
    import jam_core.ops.checkout as checkout_mod

    t = make_tree(tmp_path)
    data = make_file(t.root / "doc.txt", 300_000, seed=4)
    assert _stash(t, ["doc.txt"]).done
    real = checkout_mod.exchange
    saved = []

    def save_then_exchange(dir_fd, a, b):
        if b == "doc.txt" and not saved:
            saved.append(b)
            _editor_save(t.root / "doc.txt", b"written over the stub")
        real(dir_fd, a, b)

    monkeypatch.setattr(checkout_mod, "exchange", save_then_exchange)
    res = _checkout(t, ["doc.txt"])
    monkeypatch.undo()
    assert saved and not res.done and res.exit_code == 1, res
    assert (t.root / "doc.txt").read_bytes() == b"written over the stub"
    assert _tmp_names(t.root) == []
    # The content is still on the remote: nothing was lost on either side.
    assert b3(t.remote / "objects" / object_relpath(record_of(data))) == record_of(data).split(":")[1]


def record_of(data: bytes) -> str:
    import blake3

    return "b3:" + blake3.blake3(data).hexdigest()


# -- walks: a directory swapped for a symlink is never followed -------------------------------

def _swap_for_symlink(d: Path, target: Path) -> None:
    os.rename(d, d.with_name(d.name + ".moved"))
    os.symlink(target, d)


def _outside(tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "outside"
    make_file(out / "victim.bin", 200_000, seed=9)
    return out, listing(out)


def test_directory_swapped_for_a_symlink_mid_walk_is_not_followed(tmp_path, monkeypatch):
    """The swap lands after the parent was listed and its entry found to be a directory, at
    the very call that enters it."""
    t = make_tree(tmp_path)
    make_file(t.root / "a" / "sub" / "x.bin", 200_000, seed=5)
    make_file(t.root / "a" / "y.bin", 200_000, seed=6)
    outside, before = _outside(tmp_path)
    real_open = os.open
    swapped = []

    def swap_then_open(path, flags, *a, **kw):
        if path == "sub" and kw.get("dir_fd") is not None and flags & os.O_DIRECTORY and not swapped:
            swapped.append(True)
            _swap_for_symlink(t.root / "a" / "sub", outside)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", swap_then_open)
    res = _stash(t, ["a"])
    monkeypatch.undo()
    assert swapped
    assert listing(outside) == before, "jam touched files outside the root"
    assert [r for r, _ in res.done] == ["a/y.bin"], res


def test_directory_swapped_between_scan_and_hash_is_not_followed(tmp_path, monkeypatch):
    import jam_core.ops.stash as stash_mod

    t = make_tree(tmp_path)
    make_file(t.root / "a" / "victim.bin", 200_000, seed=5)
    make_file(t.root / "b.bin", 200_000, seed=6)
    outside, before = _outside(tmp_path)
    real = stash_mod.hash_and_place
    swapped = []

    def swap_then_hash(root, entry, *a, **kw):
        if not swapped:
            swapped.append(True)
            _swap_for_symlink(t.root / "a", outside)
        return real(root, entry, *a, **kw)

    monkeypatch.setattr(stash_mod, "hash_and_place", swap_then_hash)
    res = _stash(t, ["."])
    monkeypatch.undo()
    assert swapped
    assert listing(outside) == before, "jam touched files outside the root"
    assert [r for r, _ in res.done] == ["b.bin"] and res.exit_code == 1, res


def test_directory_swapped_before_a_checkout_swap_writes_nothing_outside(tmp_path, monkeypatch):
    """Stubs are fetched; the directory is then swapped for a symlink to a directory holding
    a file of the same name: the fetched content must not land there, nor replace it."""
    import jam_core.ops.checkout as checkout_mod

    t = make_tree(tmp_path)
    make_file(t.root / "a" / "victim.bin", 200_000, seed=5)
    assert _stash(t, ["a"]).done
    outside, before = _outside(tmp_path)
    real = checkout_mod._swap_batch
    swapped = []

    def swap_then_finish(ready, *a, **kw):
        if ready and not swapped:
            swapped.append(True)
            _swap_for_symlink(t.root / "a", outside)
        return real(ready, *a, **kw)

    monkeypatch.setattr(checkout_mod, "_swap_batch", swap_then_finish)
    _checkout(t, ["a"])
    monkeypatch.undo()
    assert swapped
    assert listing(outside) == before, "jam wrote outside the root"


def test_fifo_swapped_in_after_the_scan_does_not_hang(tmp_path, monkeypatch):
    import jam_core.ops.stash as stash_mod

    t = make_tree(tmp_path)
    make_file(t.root / "f", 200_000, seed=7)
    make_file(t.root / "g", 200_000, seed=8)
    real = stash_mod.hash_and_place

    def fifo_then_hash(root, entry, *a, **kw):
        if entry.rel == "f":
            os.unlink(t.root / "f")
            os.mkfifo(t.root / "f")
        return real(root, entry, *a, **kw)

    monkeypatch.setattr(stash_mod, "hash_and_place", fifo_then_hash)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("res", _stash(t, ["f", "g"])), daemon=True)
    worker.start()
    worker.join(120)  # a guard against a hang, not a synchronisation: it returns at once
    assert not worker.is_alive(), "jam hangs on a FIFO (and holds the root's lock)"
    res = out["res"]
    assert [r for r, _ in res.done] == ["g"]
    assert any(r == "f" for r, _ in res.skipped), res


# -- place: remotes matched by name -------------------------------------------------------------

class PlaceModifiedCopy:
    """A placement plugin that answers with a modified copy of the configured remote."""

    @hookimpl(tryfirst=True)
    def place(self, remotes):
        return [dataclasses.replace(remotes[0], tier=7, options={"note": "copied"})]


def test_place_answering_a_modified_copy_still_stores_before_the_swap(tmp_path):
    t = make_tree(tmp_path)
    data = make_file(t.root / "f", 300_000, seed=10)
    res = _stash(t, ["f"], make_plugin_manager(extra=(PlaceModifiedCopy(),)))
    assert [r for r, _ in res.done] == ["f"], res
    obj = t.remote / "objects" / object_relpath(record(t.root / "f").oid)
    assert obj.read_bytes() == data, "the file became a stub with no verified copy"


# -- what travels with the content ---------------------------------------------------------------

def _acl(uid: int) -> bytes:
    """A binary POSIX ACL: owner rw, user ``uid`` rw, group r, mask rw, other r."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 6, uid), (0x04, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
               (0x20, 4, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acl_and_user_xattrs_come_back_with_the_file(tmp_path):
    t = make_tree(tmp_path)
    data = make_file(t.root / "shared.doc", 300_000, seed=11)
    os.setxattr(t.root / "shared.doc", "system.posix_acl_access", _acl(4242))
    os.setxattr(t.root / "shared.doc", "user.origin", b"camera")
    acl = os.getxattr(t.root / "shared.doc", "system.posix_acl_access")
    mode = os.stat(t.root / "shared.doc").st_mode
    assert _stash(t, ["shared.doc"]).done
    st = os.stat(t.root / "shared.doc")
    assert st.st_mode & 0o222 == 0, "the stub must stay read-only (no ACL on the stub itself)"
    assert _checkout(t, ["shared.doc"]).done
    p = t.root / "shared.doc"
    assert p.read_bytes() == data
    assert os.getxattr(p, "system.posix_acl_access") == acl
    assert os.getxattr(p, "user.origin") == b"camera"
    assert os.stat(p).st_mode == mode
    assert not [n for n in os.listxattr(p) if n.startswith("user.jam")]


def test_a_stub_cannot_smuggle_capabilities_into_the_file(tmp_path):
    """The packed ACLs on a stub are metadata an attacker can write: only ACLs come back."""
    t = make_tree(tmp_path)
    make_file(t.root / "tool", 300_000, seed=12)
    assert _stash(t, ["tool"]).done
    p = t.root / "tool"
    os.chmod(p, 0o644)
    name = b"security.capability"
    os.setxattr(p, "user.jam.acl", bytes([len(name)]) + name + (20).to_bytes(4, "little") + b"\x01" * 20)
    os.chmod(p, 0o444)
    os.utime(p, ns=(record(p).mtime_ns, record(p).mtime_ns))
    res = _checkout(t, ["tool"])
    assert res.failed and "hostile" in res.failed[0][1], res
    assert "security.capability" not in os.listxattr(p)
    assert _tmp_names(t.root) == []


# -- every file its own success or failure --------------------------------------------------------

def test_one_unwritable_directory_fails_only_its_files(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "ok" / "a.bin", 200_000, seed=13)
    make_file(t.root / "locked" / "b.bin", 200_000, seed=14)
    subprocess.run(["chattr", "+i", str(t.root / "locked")], check=True)
    try:
        res = jam("stash", "ok", "locked", cwd=t.root, check=1)
    finally:
        subprocess.run(["chattr", "-i", str(t.root / "locked")], check=True)
    assert is_stub(t.root / "ok" / "a.bin")
    assert not is_stub(t.root / "locked" / "b.bin")
    assert "locked/b.bin" in res.err and "stashed 1 file" in res.out, res.out + res.err


def test_checkout_keep_both_fetches_the_stashed_version_beside_a_dirty_stub(tmp_path):
    t = make_tree(tmp_path)
    data = make_file(t.root / "notes.txt", 300_000, seed=15)
    assert _stash(t, ["notes.txt"]).done
    p = t.root / "notes.txt"
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"my edit of the placeholder")
    mine = p.read_bytes()
    res = jam("checkout", "notes.txt", cwd=t.root, check=1)
    assert "--keep-both" in res.err
    res = jam("checkout", "--keep-both", "notes.txt", cwd=t.root, check=0)
    assert p.read_bytes() == mine, "the written-into stub must keep its bytes"
    beside = t.root / "notes (stashed version).txt"
    assert beside.read_bytes() == data
    assert "notes (stashed version).txt" in res.out + res.err
    jam("checkout", "--keep-both", "notes.txt", cwd=t.root, check=0)
    assert (t.root / "notes (stashed version 2).txt").read_bytes() == data


def test_fifo_and_device_named_on_the_command_line_are_skipped_with_a_reason(tmp_path):
    t = make_tree(tmp_path)
    os.mkfifo(t.root / "pipe")
    os.mknod(t.root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    res = jam("stash", "pipe", "null", cwd=t.root, check=0)  # skipped, like an empty file: nothing to do
    assert "pipe: a FIFO" in res.err and "null: a character device" in res.err, res.err


def test_stub_edited_with_its_mtime_put_back_is_not_fetched_over(tmp_path):
    """`touch -r` after writing into the header block: size, mtime and blocks all unchanged."""
    t = make_tree(tmp_path)
    make_file(t.root / "f", 300_000, seed=16)
    assert _stash(t, ["f"]).done
    p = t.root / "f"
    st = os.stat(p)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"EDITED")
    os.chmod(p, 0o444)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    mine = p.read_bytes()
    res = jam("checkout", "f", cwd=t.root, check=1)
    assert "--keep-both" in res.err, res.err
    assert p.read_bytes() == mine
    assert _tmp_names(t.root) == []


def test_a_file_starting_like_a_damaged_stub_header_is_left_local(tmp_path):
    """Content that begins with jam's magic line but no trustworthy metadata: never stored as
    content (it may be a stub's placeholder), never a traceback."""
    from jam_core.stub import MAGIC

    t = make_tree(tmp_path)
    p = t.root / "odd.txt"
    p.write_bytes(MAGIC + b'{"jam":1,"id":"../../etc"}\n' + b"x" * 200_000)
    res = jam("stash", "odd.txt", cwd=t.root, check=1)
    assert "cannot be trusted" in res.err, res.err
    assert not is_stub(p) and p.read_bytes().startswith(MAGIC)

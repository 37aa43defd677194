"""Fixer F12: faults on the core's swaps that R13's tests do not inject themselves.

Each test works on real files (real xattrs and POSIX ACLs); a race is injected at its exact
instant by wrapping the function that runs then (``stash.exchange``).
"""

from __future__ import annotations

import os
import stat
import struct

import pytest

import jam_core.ops.checkout as checkout_mod
import jam_core.ops.stash as stash_mod
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, make_tree

ACL = "system.posix_acl_access"


def _stash(t, rels):
    with Session() as s:
        return stash_mod.stash(Root(t.root), rels, make_plugin_manager(), s)


def _checkout(t, rels):
    with Session() as s:
        return checkout_mod.checkout(Root(t.root), rels, make_plugin_manager(), s)


def _acl(named_perm: int) -> bytes:
    """A binary POSIX ACL: owner rw, user 4242 ``named_perm``, group r, mask rw, other none."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, named_perm, 4242), (0x04, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
               (0x20, 0, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _named_perm(acl: bytes) -> int:
    for i in range(4, len(acl), 8):
        tag, perm, ident = struct.unpack("<HHI", acl[i:i + 8])
        if tag == 0x02 and ident == 4242:
            return perm
    return -1


def test_a_setfacl_in_the_last_instant_before_the_swap_is_never_undone(tmp_path, monkeypatch):
    """User 4242 may read the file (an ACL entry); just as jam exchanges it for its stub, the
    owner takes that away (`setfacl -m u:4242:---`: the mode and mask stay as they were, no
    lease breaks, no mtime moves). The stub must not carry the old ACL back: either the
    file stays local with the new ACL, or it comes back from checkout with it.
    Guard (mutation-checked): stash._swap's post-exchange check ``_xattrs_now(s.fd) != s.xattrs``."""
    t = make_tree(tmp_path)
    f = t.root / "plan.txt"
    make_file(f, 200_000, seed=31)
    want = b3(f)
    try:
        os.setxattr(f, ACL, _acl(4))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    mode = os.stat(f).st_mode
    real = stash_mod.exchange
    done = []

    def setfacl_then_exchange(dir_fd, a, b):
        if b == "plan.txt" and not done:
            done.append(1)
            fd = os.open(b, os.O_RDONLY, dir_fd=dir_fd)
            try:
                os.setxattr(fd, ACL, _acl(0))  # the owner, at this very instant
            finally:
                os.close(fd)
        return real(dir_fd, a, b)

    monkeypatch.setattr(stash_mod, "exchange", setfacl_then_exchange)
    _stash(t, ["plan.txt"])
    monkeypatch.undo()
    assert done
    if is_stub(f):
        assert _checkout(t, ["plan.txt"]).done
    assert b3(f) == want
    assert os.stat(f).st_mode == mode, oct(os.stat(f).st_mode)
    assert _named_perm(os.getxattr(f, ACL)) == 0, "user 4242 was let back in"


def test_a_file_with_an_acl_made_in_a_directory_with_a_default_acl_keeps_its_own(tmp_path):
    """The other side of dropping an inherited ACL: a file that had its own ACL comes back
    with exactly that one (not the directory's default), in a directory with a default ACL.
    Guard (mutation-checked): checkout._restore_metadata drops the inherited ACL before
    restore_xattrs puts the file's own back (dropped after it, this test fails)."""
    t = make_tree(tmp_path)
    d = t.root / "shared"
    d.mkdir()
    f = d / "own.txt"
    make_file(f, 200_000, seed=32)
    try:
        os.setxattr(f, ACL, _acl(4))
        os.setxattr(d, "system.posix_acl_default", _acl(6))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    mode = stat.S_IMODE(os.stat(f).st_mode)
    assert _stash(t, ["shared/own.txt"]).done
    assert _checkout(t, ["shared/own.txt"]).done
    assert _named_perm(os.getxattr(f, ACL)) == 4
    assert stat.S_IMODE(os.stat(f).st_mode) == mode


def _save_over(dir_fd: int, name: str, data: bytes) -> None:
    """What an editor does on save: write a new file, rename it over the name."""
    fd = os.open(".f12-save", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(".f12-save", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _contents(top) -> set[str]:
    return {b3(p) for p in top.rglob("*") if p.is_file() and not p.is_symlink() and ".jam" not in p.parts}


@pytest.mark.parametrize("op", ["stash", "checkout"])
def test_a_save_in_the_last_instant_whose_put_back_fails_is_never_unlinked(tmp_path, monkeypatch, op):
    """The user saves over the file (or the stub) in the last instant before the exchange; the
    check after it sees another inode and exchanges back, and that exchange fails (EIO). The
    user's file is then at jam's temporary name: the cleanup must leave it there (doctor shows
    it), never unlink it as the stub or the fetched content it thought was there.
    Guard (mutation-checked): stash._put_back / checkout._put_back clear ``tmp`` when the
    exchange back fails."""
    import errno

    import blake3

    t = make_tree(tmp_path)
    f = t.root / "notes.txt"
    make_file(f, 200_000, seed=33)
    if op == "checkout":
        assert _stash(t, ["notes.txt"]).done
    mod = stash_mod if op == "stash" else checkout_mod
    new = os.urandom(150_000)
    real = mod.exchange
    calls = []

    def save_exchange_then_fail(dir_fd, a, b):
        calls.append(b)
        if len(calls) == 1:
            _save_over(dir_fd, "notes.txt", new)  # the editor, in the last instant
            return real(dir_fd, a, b)
        raise OSError(errno.EIO, "Input/output error")  # every exchange back

    monkeypatch.setattr(mod, "exchange", save_exchange_then_fail)
    res = _stash(t, ["notes.txt"]) if op == "stash" else _checkout(t, ["notes.txt"])
    monkeypatch.undo()
    assert len(calls) >= 2 and res.failed, res
    assert blake3.blake3(new).hexdigest() in _contents(t.root), "the file saved in the last instant is gone"


def test_the_daemons_fill_as_root_never_makes_a_setgid_file_its_owner_could_not_make(tmp_path):
    """The daemon (root: fanotify needs it) fills a stub in place and applies its record's mode.
    User 4321, not in group 3333, owns a stub of group 3333 (made in their setgid project
    directory) whose record they set to mode 02755: the filled file must not be a setgid-3333
    program. Guard (mutation-checked): worker.fill applies checkout._allowed_mode."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from jam_core.daemon.worker import fill

    proj = tmp_path / "proj"
    proj.mkdir()
    os.chown(proj, 4321, 3333)
    os.chmod(proj, 0o2775)
    data = os.urandom(10_000)
    fd = os.open(proj / "tool", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchown(fd, 4321, -1)
        assert os.fstat(fd).st_gid == 3333

        class Rec:  # what fill reads of a stub's record
            size, mode, mtime_ns = len(data), 0o2755, 1_000_000_000

        fill(fd, memoryview(data), Rec)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert (st.st_gid, bool(st.st_mode & stat.S_ISGID)) != (3333, True), oct(st.st_mode)
    assert st.st_mode & 0o777 == 0o755

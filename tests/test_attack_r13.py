"""Attacker review R13: the core stash / checkout / status on hostile file kinds and races.

Each test works on real files (real xattrs, real mounts, real `jam` processes); a race is
injected at its exact instant by wrapping the function that runs then. A test marked
``xfail(strict=True, reason="BUG: ...")`` proves a hole (the fix is in the review's report);
the others name the guard they were mutation-checked against.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

import jam_core.ops.checkout as checkout_mod
import jam_core.ops.stash as stash_mod
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, jam, make_tree, record, status_json


def _stash(t, rels):
    with Session() as s:
        return stash_mod.stash(Root(t.root), rels, make_plugin_manager(), s)


def _checkout(t, rels):
    with Session() as s:
        return checkout_mod.checkout(Root(t.root), rels, make_plugin_manager(), s)


def _tmp_names(top: Path) -> list[str]:
    return [str(p) for p in top.rglob(".jam-*")]


def _mount_or_skip(args: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    res = subprocess.run(["mount", *args], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount here: {res.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def other_disk(tmp_path):
    """A real ext4 filesystem (a loop-mounted image) to mount inside a root: returns a function
    mounting it at a path; unmounted at the end."""
    mounted: list[Path] = []

    def mount_at(where: Path) -> None:
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
        where.mkdir(parents=True, exist_ok=True)
        _mount_or_skip(["-o", "loop", str(img), str(where)])
        mounted.append(where)

    yield mount_at
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# -- a user's change in the last instant --------------------------------------------------------

def test_a_chmod_600_in_the_last_instant_before_the_swap_is_never_undone(tmp_path, monkeypatch):
    """The user makes a file private (chmod 600) just as jam exchanges it for its stub: the
    lease does not break on a chmod and the check after the exchange compares inode, size
    and mtime only. The stub records 0644 and a checkout brings the file back world-readable.
    Guard (mutation-checked): stash._swap's post-exchange check ``held.st_mode != s.st0.st_mode``."""
    t = make_tree(tmp_path)
    f = t.root / "diary.txt"
    make_file(f, 200_000, seed=1)
    os.chmod(f, 0o644)
    real = stash_mod.exchange
    done = []

    def chmod_then_exchange(dir_fd, a, b):
        if b == "diary.txt" and not done:
            done.append(1)
            os.chmod(b, 0o600, dir_fd=dir_fd)  # the user, at this very instant
        return real(dir_fd, a, b)

    monkeypatch.setattr(stash_mod, "exchange", chmod_then_exchange)
    _stash(t, ["diary.txt"])
    monkeypatch.undo()
    assert done
    if is_stub(f):
        assert _checkout(t, ["diary.txt"]).done
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, oct(os.stat(f).st_mode)


# -- another filesystem mounted inside the root ---------------------------------------------------

def _devs_synced(module, monkeypatch) -> tuple[list[int], list[tuple[int, bool]]]:
    """Watch what is made durable and what is exchanged: every syncfs (``module``'s and
    jam_core.fs's) and every fsync records its filesystem's device; every exchange of ``module``
    records its directory's device and whether that device was made durable before it."""
    import jam_core.fs as fs

    synced: list[int] = []
    swaps: list[tuple[int, bool]] = []

    def dev_of(fd):
        return os.fstat(fd).st_dev if isinstance(fd, int) else os.stat(fd).st_dev

    def watch(real):
        def wrapped(fd, *a, **kw):
            synced.append(dev_of(fd))
            return real(fd, *a, **kw)
        return wrapped

    real_ex = module.exchange

    def rec_ex(dir_fd, a, b):
        dev = os.fstat(dir_fd).st_dev
        swaps.append((dev, dev in synced))
        return real_ex(dir_fd, a, b)

    monkeypatch.setattr(module, "syncfs", watch(module.syncfs))
    monkeypatch.setattr(fs, "syncfs", watch(fs.syncfs))
    monkeypatch.setattr(os, "fsync", watch(os.fsync))
    monkeypatch.setattr(module, "exchange", rec_ex)
    return synced, swaps


def test_a_stub_on_another_disk_inside_the_root_is_durable_before_its_swap(tmp_path, monkeypatch, other_disk):
    """A second disk mounted at ROOT/photos (a real loop-mounted ext4): the stub written aside
    there is not made durable by a syncfs of the root's filesystem, yet the original is
    exchanged out and unlinked; a crash then can leave a stub whose header block never reached
    the disk (a file of zeros where the original was).
    Guard (mutation-checked): stash._swap_batch syncs each fd of Filesystems.of(its directories)."""
    t = make_tree(tmp_path)
    other_disk(t.root / "photos")
    sub_dev = os.stat(t.root / "photos").st_dev
    assert sub_dev != os.stat(t.root).st_dev
    make_file(t.root / "photos" / "a.raw", 300_000, seed=2)
    _synced, swaps = _devs_synced(stash_mod, monkeypatch)
    res = _stash(t, ["photos"])
    monkeypatch.undo()
    assert [r for r, _ in res.done] == ["photos/a.raw"], res
    assert [s for s in swaps if s[0] == sub_dev], "no swap on the other disk"
    assert all(ok for dev, ok in swaps if dev == sub_dev), "swapped before the other disk was synced"


def test_content_fetched_onto_another_disk_inside_the_root_is_durable_before_its_swap(tmp_path, monkeypatch,
                                                                                       other_disk):
    """As above for checkout: the fetched content on the mounted disk is exchanged with its stub
    and the stub unlinked without a sync of that disk; a crash can leave a writable file of
    zeros (no longer a stub) that the next stash would store as the user's content.
    Guard (mutation-checked): checkout._swap_batch syncs each fd of Filesystems.of(its directories)."""
    t = make_tree(tmp_path)
    other_disk(t.root / "photos")
    sub_dev = os.stat(t.root / "photos").st_dev
    make_file(t.root / "photos" / "a.raw", 300_000, seed=3)
    want = b3(t.root / "photos" / "a.raw")
    assert _stash(t, ["photos"]).done
    _synced, swaps = _devs_synced(checkout_mod, monkeypatch)
    res = _checkout(t, ["photos"])
    monkeypatch.undo()
    assert res.done and b3(t.root / "photos" / "a.raw") == want
    assert [s for s in swaps if s[0] == sub_dev], "no swap on the other disk"
    assert all(ok for dev, ok in swaps if dev == sub_dev), "swapped before the other disk was synced"


# -- status: a wrong answer a user would trust -----------------------------------------------------

def test_status_counts_a_hard_linked_files_blocks_once_on_this_disk(tmp_path):
    """Guard (mutation-checked): status._scan counts a file with st_nlink > 1 once per (st_dev, st_ino)."""
    t = make_tree(tmp_path)
    make_file(t.root / "a" / "movie.mkv", 4 << 20, seed=4)
    (t.root / "b").mkdir()
    os.link(t.root / "a" / "movie.mkv", t.root / "b" / "movie.mkv")
    blocks = os.stat(t.root / "a" / "movie.mkv").st_blocks * 512
    total = status_json(t.root)["total"]
    du = int(subprocess.run(["du", "-s", "-B1", "--exclude=.jam", str(t.root)], capture_output=True,
                            text=True, check=True).stdout.split()[0])
    assert total["disk_bytes"] < 2 * blocks, (total, blocks, du)


# -- file kinds ---------------------------------------------------------------------------------

def test_a_setuid_file_of_another_user_comes_back_with_its_owner_and_every_mode_bit(tmp_path):
    """Stashed and checked out by root, a file of another user (uid 4321, gid 8765, mode 4750)
    comes back with its owner, its group and its setuid bit: the stub carries the owner, and
    checkout's ``_restore_metadata`` chowns before it chmods (a chown clears setuid).
    Guard (mutation-checked): ``_restore_metadata``'s fchown (without it the file comes back
    root's and this test fails)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    t = make_tree(tmp_path)
    f = t.root / "tool"
    make_file(f, 200_000, seed=5)
    os.chown(f, 4321, 8765)
    os.chmod(f, 0o4750)
    want = b3(f)
    assert _stash(t, ["tool"]).done
    st = os.lstat(f)
    assert is_stub(f) and (st.st_uid, st.st_gid) == (4321, 8765), st
    assert _checkout(t, ["tool"]).done
    st = os.lstat(f)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 8765, 0o4750), (st, oct(st.st_mode))
    assert b3(f) == want


def _cap_net_bind_service() -> bytes:
    """A VFS_CAP_REVISION_2 security.capability value: cap_net_bind_service=ep."""
    return (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


@pytest.mark.parametrize("xattr_name", ["security.capability", "trusted.backup-tag"])
def test_a_file_with_capabilities_keeps_them_or_stays_local(tmp_path, xattr_name):
    """`setcap cap_net_bind_service=ep server` (or a backup tool's trusted.* xattr) then `jam
    stash`: the stub cannot carry them safely (a stub's xattrs are writable by its owner), so
    the file must stay local with a reason; instead it is stashed and comes back from
    checkout without them.
    Guard (mutation-checked): fs.carried_xattrs raises NotCarried (_not_carried); stash skips the file."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    t = make_tree(tmp_path)
    f = t.root / "server"
    make_file(f, 200_000, seed=6)
    os.chmod(f, 0o755)
    try:
        os.setxattr(f, xattr_name, _cap_net_bind_service() if xattr_name == "security.capability" else b"kept")
    except OSError as exc:
        pytest.skip(f"no {xattr_name} here: {exc}")
    res = _stash(t, ["server"])
    if is_stub(f):
        assert _checkout(t, ["server"]).done
    assert xattr_name in os.listxattr(f), res


@pytest.mark.parametrize("flag", ["i", "a"])
def test_an_immutable_or_append_only_file_stays_as_it_is_and_leaves_nothing_behind(tmp_path, flag):
    """`chattr +i` / `chattr +a`: the file cannot be renamed, so the exchange fails; the file keeps
    its bytes and its name, jam says so (exit 1) and leaves no stub written aside. Its neighbour
    is stashed. Mutation-checked: without ``_release``'s unlink of the stubs left aside
    (``s.tmp``) a .jam-*.tmp stays in the directory and this test fails."""
    t = make_tree(tmp_path)
    f = t.root / "log"
    make_file(f, 200_000, seed=7)
    make_file(t.root / "other", 200_000, seed=8)
    want = b3(f)
    if subprocess.run(["chattr", f"+{flag}", str(f)], capture_output=True).returncode != 0:
        pytest.skip("chattr does not work here")
    try:
        res = _stash(t, ["log", "other"])
        assert [r for r, _ in res.failed] == ["log"], res
        assert not is_stub(f) and b3(f) == want
        assert is_stub(t.root / "other")
        assert _tmp_names(t.root) == []
    finally:
        subprocess.run(["chattr", f"-{flag}", str(f)], check=True)


# -- resource faults ------------------------------------------------------------------------------

def test_the_disk_filling_up_as_stash_records_its_stubs_never_hides_what_was_stashed(tmp_path, monkeypatch,
                                                                                   runner):
    """The root's disk fills up mid-batch: the stubs written aside and swapped in took the last
    blocks and SQLite cannot grow the catalog as the second stub is recorded (injected at that
    instant: ``Catalog.add_stub``). That file is already a stub; jam says only "no space left
    ... run the command again", the catalog (and the cd hook's index, made from it) does not
    know the stub, and nothing tells the user to run `jam doctor --fix`.
    Guard (mutation-checked): stash._swap_all/_swap_batch catch the catalog's sqlite3.Error (_not_recorded)."""
    import sqlite3

    from jam_core.catalog import Catalog
    from jam_core.cli import main
    from jam_core.root import CATALOG

    t = make_tree(tmp_path)
    names = [f"f{i}" for i in range(5)]
    for i, n in enumerate(names):
        make_file(t.root / n, 100_000, seed=20 + i)
    real = Catalog.add_stub
    calls = []

    def full_disk(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, path, *a, **kw)

    monkeypatch.setattr(Catalog, "add_stub", full_disk)
    monkeypatch.chdir(t.root)
    res = runner.invoke(main, ["stash", *names])
    monkeypatch.undo()
    assert res.exit_code != 0 and "Traceback" not in res.output
    stubs = {n for n in names if is_stub(t.root / n)}
    assert stubs, "nothing was stashed: the fault came too early"
    assert _tmp_names(t.root) == []
    for n in stubs:  # every stub's object is on the remote (nothing half-done there)
        oid = record(t.root / n).oid.split(":")[1]
        assert (t.objects / "b3" / oid[:2] / oid).is_file(), n
    with Catalog(t.root / ".jam" / CATALOG) as cat:
        known = set(cat.stubs())
    told = "doctor" in res.output + res.stderr and f"stashed {len(stubs)}" in res.output + res.stderr
    assert stubs <= known or told, (stubs, known, res.output, res.stderr)


def test_a_private_file_in_a_setgid_directory_comes_back_with_its_own_group(tmp_path):
    """A shared project directory is setgid to group 3333 (`chmod g+s`); the user's file in it
    was made private: `chgrp` to the user's own group and mode 0640. Stash writes its stub as a
    new file in that directory (it takes group 3333) and skips the chown because the file's
    owner equals jam's own (euid, egid); checkout does the same, and the file comes back
    group 3333 with mode 0640: readable by the whole project group.
    Guard (mutation-checked): write_stub_aside and checkout._restore_metadata compare the new
    file's own fstat owner with the recorded one (not jam's ids) before the fchown."""
    t = make_tree(tmp_path)
    d = t.root / "project"
    d.mkdir()
    os.chown(d, -1, 3333)
    os.chmod(d, 0o2775)
    f = d / "salaries.ods"
    make_file(f, 200_000, seed=9)
    os.chown(f, os.geteuid(), os.getegid())
    os.chmod(f, 0o640)
    assert os.stat(f).st_gid == os.getegid() != 3333
    assert _stash(t, ["project/salaries.ods"]).done
    assert os.stat(f).st_gid == os.getegid(), "the stub took the directory's group"
    assert _checkout(t, ["project/salaries.ods"]).done
    st = os.stat(f)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getegid(), 0o640), (st.st_gid, oct(st.st_mode))


def test_keep_both_fetches_the_stashed_version_of_a_stub_with_a_long_name(tmp_path):
    """A 250-byte name (valid: NAME_MAX is 255) whose stub was written into: `jam checkout
    --keep-both` is the way jam offers to get the stashed version back; it fails with "File
    name too long" every time.
    Guard (mutation-checked): checkout.beside_name shortens the stem to fit NAME_MAX."""
    t = make_tree(tmp_path)
    name = "r" * 246 + ".txt"
    f = t.root / name
    make_file(f, 200_000, seed=10)
    want = b3(f)
    assert _stash(t, [name]).done
    os.chmod(f, 0o644)
    with open(f, "r+b") as h:
        h.write(b"my notes")
    os.chmod(f, 0o444)
    res = jam("checkout", "--keep-both", name, cwd=t.root, check=None)
    beside = [p for p in t.root.iterdir() if p.name != name and not p.name.startswith(".")]
    assert len(beside) == 1 and b3(beside[0]) == want, (res.out, res.err)
    assert f.read_bytes()[:8] == b"my notes"
    assert _tmp_names(t.root) == []


def _acl(uid: int) -> bytes:
    """A binary POSIX ACL: owner rwx, user ``uid`` rwx, group rx, mask rwx, other rx."""
    import struct

    entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 7, uid), (0x04, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF),
               (0x20, 5, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_file_without_an_acl_in_a_directory_with_a_default_acl_comes_back_without_one(tmp_path):
    """A shared directory carries a default ACL granting user 4242 access to new files; the
    user's file in it has no ACL of its own (made before the default, or cleared with
    `setfacl -b`), mode 0640: user 4242 cannot read it. Checkout creates the content as a
    new file in that directory: it inherits the default ACL, and as the original had none to
    restore, it stays: after the round trip user 4242 can read the file.
    Guard (mutation-checked): checkout._restore_metadata calls fs.drop_inherited_acl before its fchmod."""
    t = make_tree(tmp_path)
    d = t.root / "shared"
    d.mkdir()
    f = d / "review.txt"
    make_file(f, 200_000, seed=11)
    os.chmod(f, 0o640)
    try:
        os.setxattr(d, "system.posix_acl_default", _acl(4242))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    assert "system.posix_acl_access" not in os.listxattr(f)
    assert _stash(t, ["shared/review.txt"]).done
    assert _checkout(t, ["shared/review.txt"]).done
    assert "system.posix_acl_access" not in os.listxattr(f), "user 4242 was let in by the directory's default ACL"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


# -- Ctrl-C at the exact instant ------------------------------------------------------------------

def _save_over(dir_fd: int, name: str, data: bytes) -> None:
    """What an editor does on save: write a new file, rename it over the name."""
    fd = os.open(".r13-save", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(".r13-save", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _contents(top: Path) -> set[str]:
    """The b3 of every regular file under ``top`` (hidden and jam-temporary names included)."""
    return {b3(p) for p in top.rglob("*") if p.is_file() and not p.is_symlink() and ".jam" not in p.parts}


def test_ctrl_c_as_stash_puts_back_a_file_saved_in_the_last_instant_never_deletes_it(tmp_path, monkeypatch):
    """The user saves over the file in the last instant before the exchange (as in
    test_save_over_the_original_in_the_last_instant_is_kept) and presses Ctrl-C as the
    exchange returns: the new file is then at jam's temporary name, waiting to be exchanged
    back; the KeyboardInterrupt skips the put-back and the cleanup unlinks that name.
    Guard (mutation-checked): stash._put_back (tmp no longer the stub's inode: exchange back)."""
    import signal

    t = make_tree(tmp_path)
    f = t.root / "notes.txt"
    make_file(f, 200_000, seed=12)
    new = os.urandom(150_000)
    real = stash_mod.exchange
    calls = []

    def save_then_exchange_then_ctrl_c(dir_fd, a, b):
        calls.append((a, b))
        if len(calls) == 1:
            _save_over(dir_fd, "notes.txt", new)  # the editor, in the last instant
        real(dir_fd, a, b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered as the exchange returns

    monkeypatch.setattr(stash_mod, "exchange", save_then_exchange_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _stash(t, ["notes.txt"])
    monkeypatch.undo()
    assert calls
    import blake3

    assert blake3.blake3(new).hexdigest() in _contents(t.root), "the file saved in the last instant is gone"


def test_ctrl_c_as_checkout_puts_back_a_file_saved_over_the_stub_never_deletes_it(tmp_path, monkeypatch):
    """As above for checkout (a Ctrl-C during the cd hook's fetch): the user saves a new file
    over the stub just after swap_in checked it; the exchange puts the fetched content at the
    name and the user's file at jam's temporary name; Ctrl-C skips the put-back and
    ``_drop_tmps`` unlinks the user's file.
    Guard (mutation-checked): checkout._put_back (tmp no longer the content's inode: exchange back)."""
    import signal

    t = make_tree(tmp_path)
    f = t.root / "notes.txt"
    make_file(f, 200_000, seed=13)
    assert _stash(t, ["notes.txt"]).done
    new = os.urandom(150_000)
    real = checkout_mod.exchange
    calls = []

    def save_then_exchange_then_ctrl_c(dir_fd, a, b):
        calls.append((a, b))
        if len(calls) == 1:
            _save_over(dir_fd, "notes.txt", new)
        real(dir_fd, a, b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkout_mod, "exchange", save_then_exchange_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _checkout(t, ["notes.txt"])
    monkeypatch.undo()
    assert calls
    import blake3

    assert blake3.blake3(new).hexdigest() in _contents(t.root), "the file saved in the last instant is gone"


def test_checkout_as_root_never_makes_a_setgid_file_its_owner_could_not_make(tmp_path):
    """A user (uid 4321, not in group 3333) owns a directory of the project group 3333, setgid
    (files made in it take group 3333). The kernel never lets that user set the setgid bit on
    a file of group 3333 (chmod clears it). But a stub's record is theirs to write: they copy
    a stub of any program jam stashed (here `pub/tool`, content on the remote), set its
    user.jam record's mode to 02755 (a stub is metadata its owner writes), and wait for root's
    checkout (the cd hook in a root shell, a cron job): root creates the file with the
    stub's owner and group and applies the record's mode, setgid included (root has
    CAP_FSETID). The user now runs a program with group 3333.
    Guard (mutation-checked): checkout._allowed_mode drops a setgid bit outside the owner's groups."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from dataclasses import replace

    from jam_core.stub import write_stub

    t = make_tree(tmp_path)
    make_file(t.root / "pub" / "tool", 200_000, seed=14)
    os.chmod(t.root / "pub" / "tool", 0o755)
    assert _stash(t, ["pub/tool"]).done
    rec = record(t.root / "pub" / "tool")
    proj = t.root / "proj"
    proj.mkdir()
    os.chown(proj, 4321, 3333)
    os.chmod(proj, 0o2775)
    # What the user can do without jam: a file in their directory takes group 3333; chmod g+s
    # by them is refused (cleared by the kernel). What they write: a stub of their own, with
    # the record of pub/tool and mode 02755 (their own file's user.jam xattr).
    forged = replace(rec, mode=0o2755)
    fd = os.open(proj / "tool", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchown(fd, 4321, -1)
        write_stub(fd, forged, "tool", rec.mtime_ns)
    finally:
        os.close(fd)
    assert os.stat(proj / "tool").st_gid == 3333
    _checkout(t, ["proj/tool"])
    st = os.lstat(proj / "tool")
    made = (st.st_uid, st.st_gid, bool(st.st_mode & stat.S_ISGID))
    assert not (made[1] == 3333 and made[2]), f"a setgid-3333 file of user 4321: {made}, {oct(st.st_mode)}"


def test_status_counts_a_small_stub_made_writable_as_a_stub(tmp_path):
    """`chmod -R g+w project` (a shared tree) makes every stub writable; a stub of a file
    smaller than one block is not sparse (its header fills its only block). Status's fast
    path takes it for a local file: it reports the stub as local and its bytes as on this
    disk, though checkout (which reads the xattr) fetches it as the stub it is.
    Guard (mutation-checked): status._scan reads (look=ALWAYS) every name the catalog knows as a stub."""
    t = make_tree(tmp_path)
    make_file(t.root / "small.cfg", 3000, seed=15)
    assert _stash(t, ["small.cfg"]).done
    os.chmod(t.root / "small.cfg", 0o664)
    total = status_json(t.root)["total"]
    assert (total["stubs"], total["local"], total["stub_bytes"]) == (1, 0, 3000), total


def test_a_file_mapped_writable_by_a_program_that_closed_it_stays_local(tmp_path):
    """A program maps a file shared and writable, then closes its descriptor (databases and
    editors do): no descriptor is open for writing, yet every store through the mapping
    changes the file. Stashing it would unlink the inode the program keeps writing to. The
    read lease cannot be taken while the mapping holds the file open for writing, so the file
    stays local. Mutation-checked: with ``Leases.take`` answering False (no lease support) the
    file is stashed and a later store through the mapping is lost."""
    t = make_tree(tmp_path)
    f = t.root / "db.bin"
    make_file(f, 256 << 10, seed=16)
    code = ("import ctypes, os, sys\n"  # libc's mmap: Python's mmap object keeps a dup of the descriptor
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,"
            " ctypes.c_long)\n"
            "libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "size = os.fstat(fd).st_size\n"
            "addr = libc.mmap(None, size, 3, 1, fd, 0)\n"  # PROT_READ|PROT_WRITE, MAP_SHARED
            "assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()\n"
            "os.close(fd)\n"
            "print('mapped', flush=True)\n"
            "sys.stdin.readline()\n"
            "ctypes.memmove(addr, b'SAVED', 5)\n"
            "libc.msync(addr, size, 4)\n"  # MS_SYNC
            "print('stored', flush=True)\n"
            "sys.stdin.readline()\n")
    import sys

    prog = subprocess.Popen([sys.executable, "-c", code, str(f)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert prog.stdout.readline().strip() == "mapped"
        assert not [p for p in os.listdir(f"/proc/{prog.pid}/fd") if os.path.realpath(f"/proc/{prog.pid}/fd/{p}")
                    == str(f)], "the program still holds a descriptor"
        res = _stash(t, ["db.bin"])
        prog.stdin.write("\n")
        prog.stdin.flush()
        assert prog.stdout.readline().strip() == "stored"
    finally:
        prog.stdin.close()
        prog.wait(timeout=30)
    assert not is_stub(f), res
    assert f.read_bytes()[:5] == b"SAVED"


def test_stashing_a_private_file_never_lets_another_local_user_read_it(tmp_path):
    """A home directory others may enter (0755: Debian and Ubuntu before 21.04, many servers)
    holds a root with the embedded default remote (~/.local/share/jam/remotes/default). The
    user's file is private (0600): user 4321 cannot read it. After `jam stash`, the same bytes
    sit in the remote's objects/ as a 0444 file under 0755 directories: user 4321 lists them
    and reads the private file.
    Guard (mutation-checked): jam_dir.check_remote and _mkdirs_below make objects/, tmp/ and the
    fan-out directories 0700, and ensure_default_remote the default remote's directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to act as another user)")
    import shutil
    import sys
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="r13-home-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
                   XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
        root = home / "docs"
        root.mkdir()
        jam("init", ".", cwd=root, env=env)
        secret = root / "salary.txt"
        secret.write_bytes(b"the private numbers " * 20_000)
        os.chmod(secret, 0o600)
        jam("stash", "salary.txt", cwd=root, env=env)
        assert is_stub(secret)
        probe = ("import os, sys\n"
                 "found = 0\n"
                 "for d, _dirs, files in os.walk(sys.argv[1]):\n"
                 "    for n in files:\n"
                 "        try:\n"
                 "            with open(os.path.join(d, n), 'rb') as f:\n"
                 "                found += b'the private numbers' in f.read(4096)\n"
                 "        except OSError:\n"
                 "            pass\n"
                 "print(found)\n")

        def as_other():
            os.setgroups([])
            os.setgid(4321)
            os.setuid(4321)

        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # one user 4321 may run
        res = subprocess.run([python, "-c", probe, str(home)], capture_output=True, text=True,
                             preexec_fn=as_other, cwd="/")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "0", "user 4321 read the private file's content on the remote"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_sigterm_as_stash_puts_back_a_file_saved_in_the_last_instant_leaves_the_save_at_its_name(tmp_path):
    """As the Ctrl-C test, with SIGTERM: `jam stash` runs in a child (the real CLI), the user
    saves over the file in the last instant before the exchange, and SIGTERM arrives as the
    exchange returns. jam installs no handler for it: the process dies with the user's save
    at jam's temporary name (hidden from every scan) and the stub of the old content at the
    file's name.
    Guard (mutation-checked): ops.common.ends_as_interrupt around stash (SIGTERM raises Terminated)."""
    import signal

    import blake3

    from jam_core.cli import main

    t = make_tree(tmp_path)
    f = t.root / "notes.txt"
    make_file(f, 200_000, seed=18)
    new = os.urandom(150_000)
    pid = os.fork()
    if pid == 0:  # the child: the real CLI, with the fault at the exact instant
        try:
            os.chdir(t.root)
            real = stash_mod.exchange
            calls = []

            def save_then_exchange_then_term(dir_fd, a, b):
                calls.append(b)
                if len(calls) == 1:
                    _save_over(dir_fd, "notes.txt", new)
                real(dir_fd, a, b)
                if len(calls) == 1:
                    os.kill(os.getpid(), signal.SIGTERM)

            stash_mod.exchange = save_then_exchange_then_term
            main(["stash", "notes.txt"])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WIFEXITED(status)
    assert b3(f) == blake3.blake3(new).hexdigest(), "the save is not at its name"

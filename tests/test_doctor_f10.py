"""F10: doctor's fixes for R14's holes, the paths R14's tests do not reach on their own: an
unknown stub in a directory doctor cannot open, and a header repaired through a new stub
swapped in (owner, xattrs and mode kept; a second run clean)."""

from __future__ import annotations

import json
import os
import sqlite3

from jam_core.stub import HEADER_MAX
from tests.conftest import make_file
from tests.safety_support import jam, make_tree, record
from tests.test_attack_r14 import NOBODY, SIZE, _obj, _zero_header, nobody_tree  # noqa: F401  (the fixture)


def test_an_unknown_stub_in_a_directory_doctor_cannot_open_is_unseen(nobody_tree):
    """`locked/g.bin` is a stub the catalog does not know (its row deleted: no row makes doctor
    look again), its object lost; `locked` is mode 000 for the user running doctor. The walk
    cannot open it: doctor names it (`unseen`, exit 1), before and after --fix.
    Guard (mutation-checked): ops/doctor._Doctor.walk_error (the walk's error on a directory it
    cannot open is recorded as `unseen`)."""
    t, env, as_nobody = nobody_tree
    make_file(t.root / "locked" / "g.bin", SIZE, seed=21)
    jam("stash", "locked/g.bin", cwd=t.root, env=env)
    _obj(t.remote, record(t.root / "locked" / "g.bin").oid).unlink()
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    db.execute("DELETE FROM stubs")
    db.commit()
    db.close()
    os.chmod(t.root / "locked", 0)
    for args in (("doctor", "--json"), ("doctor", "--fix", "--json")):
        out = json.loads(as_nobody(*args, check=1).stdout)
        assert ("unseen", "locked", False) in {(c["kind"], c["path"], c["fixed"]) for c in out["problems"]}, out


def test_a_lost_header_comes_back_through_a_new_stub_keeping_owner_and_xattrs(tmp_path):
    """f.bin (owned by nobody, with a user xattr of its own) loses its header block to zeros.
    `jam doctor --fix` (run as root) repairs it through a new stub swapped in: the name holds a
    clean stub again with the same owner, mode, mtime, record and user xattr; no temporary
    file is left; a second doctor is clean.
    Guard (mutation-checked): ops/doctor._Doctor.rewrite's fchown of the new stub to the old
    one's owner."""
    t = make_tree(tmp_path)
    p = t.root / "f.bin"
    make_file(p, SIZE, seed=22)
    os.setxattr(p, "user.mine", b"kept")
    jam("stash", "f.bin", cwd=t.root)
    if os.geteuid() == 0:
        os.chown(p, NOBODY, NOBODY)
    before = os.stat(p)
    rec = os.getxattr(p, "user.jam")
    _zero_header(p)
    assert not p.read_bytes()[:HEADER_MAX].strip(b"\0")
    out = json.loads(jam("doctor", "--fix", "--json", cwd=t.root, check=0).out)
    assert ("bad-header", "f.bin", True) in {(c["kind"], c["path"], c["fixed"]) for c in out["problems"]}, out
    after = os.stat(p)
    assert after.st_ino != before.st_ino  # a new inode: nothing was written in place
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_mtime_ns, after.st_size) == \
        (before.st_uid, before.st_gid, before.st_mode, before.st_mtime_ns, before.st_size)
    assert os.getxattr(p, "user.jam") == rec and os.getxattr(p, "user.mine") == b"kept"
    assert p.read_bytes()[:HEADER_MAX].strip(b"\0")  # a header again
    assert sorted(os.listdir(t.root)) == [".jam", "f.bin"]
    jam("doctor", cwd=t.root, check=0)


def test_stubs_hidden_by_a_bind_mount_of_the_same_filesystem_are_never_forgotten(tmp_path):
    """`sub/g.bin` is a stub; an empty directory of the same filesystem is then bind-mounted on
    `sub` (the same st_dev: R14's tmpfs test does not reach this), hiding it. `--fix` must keep
    its row (`unseen`, exit 1), and `jam gc` must not remove its only copy.
    Guard (mutation-checked): ops/doctor._Doctor.probe_dir's mount-point test
    (``_mount_points``, /proc/self/mountinfo)."""
    import shutil
    import subprocess

    import pytest

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a bind mount needs root and mount(8)")
    t = make_tree(tmp_path)
    make_file(t.root / "sub" / "g.bin", SIZE, seed=23)
    make_file(t.root / "f.bin", SIZE, seed=24)
    jam("stash", "f.bin", "sub/g.bin", cwd=t.root)
    oid = record(t.root / "sub" / "g.bin").oid
    empty = tmp_path / "empty"
    empty.mkdir()
    assert os.stat(empty).st_dev == os.stat(t.root).st_dev
    subprocess.run(["mount", "--bind", str(empty), str(t.root / "sub")], check=True)
    try:
        out = json.loads(jam("doctor", "--fix", "--json", cwd=t.root, check=1).out)
        assert ("unseen", "sub", False) in {(c["kind"], c["path"], c["fixed"]) for c in out["problems"]}, out
        jam("gc", cwd=t.root, check=None)
    finally:
        subprocess.run(["umount", str(t.root / "sub")], check=True)
    assert _obj(t.remote, oid).is_file(), "gc removed the only copy of a stub hidden under a bind mount"
    jam("checkout", "sub/g.bin", cwd=t.root)


def test_a_stub_hidden_by_a_file_bind_mounted_over_it_is_never_forgotten(tmp_path):
    """A file is bind-mounted over the stub `g.bin` itself: the walk sees that file (local), not
    the stub. `--fix` must keep the stub's row (`unseen`, exit 1), and gc its only copy.
    Guard (mutation-checked): ops/doctor._Doctor.hidden's mount-point test of the row's own path."""
    import shutil
    import subprocess

    import pytest

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a bind mount needs root and mount(8)")
    t = make_tree(tmp_path)
    make_file(t.root / "g.bin", SIZE, seed=25)
    jam("stash", "g.bin", cwd=t.root)
    oid = record(t.root / "g.bin").oid
    other = tmp_path / "other.txt"
    other.write_bytes(b"another file\n")
    subprocess.run(["mount", "--bind", str(other), str(t.root / "g.bin")], check=True)
    try:
        out = json.loads(jam("doctor", "--fix", "--json", cwd=t.root, check=1).out)
        assert ("unseen", "g.bin", False) in {(c["kind"], c["path"], c["fixed"]) for c in out["problems"]}, out
        jam("gc", cwd=t.root, check=None)
    finally:
        subprocess.run(["umount", str(t.root / "g.bin")], check=True)
    assert _obj(t.remote, oid).is_file(), "gc removed the only copy of a stub hidden under a bind mount"
    jam("checkout", "g.bin", cwd=t.root)


def _moved_away(tmp_path, what: str):
    """A root with the stubs `d/g.bin` and `f.bin`; ``what`` (`f.bin` or the directory `d`) is
    moved out of the root with `mv` (xattrs kept) and a symlink to it left in its place."""
    import shutil

    t = make_tree(tmp_path)
    make_file(t.root / "d" / "g.bin", SIZE, seed=26)
    make_file(t.root / "f.bin", SIZE, seed=27)
    jam("stash", "f.bin", "d/g.bin", cwd=t.root)
    oids = {rel: record(t.root / rel).oid for rel in ("f.bin", "d/g.bin")}
    away = tmp_path / "elsewhere"
    away.mkdir()
    shutil.move(str(t.root / what), str(away / what))
    os.symlink(away / what, t.root / what)
    return t, oids, away


def test_a_stub_moved_out_and_symlinked_back_keeps_its_content(tmp_path):
    """`mv f.bin /elsewhere; ln -s /elsewhere/f.bin f.bin`: the stub lives on outside the root,
    reached through the link. `doctor --fix` must not forget its row (`unseen`, exit 1, the
    way back named), so `jam gc` keeps its only copy; moved back, it checks out.
    Guard (mutation-checked): ops/doctor._Doctor.linked_away."""
    t, oids, away = _moved_away(tmp_path, "f.bin")
    out = json.loads(jam("doctor", "--fix", "--json", cwd=t.root, check=1).out)
    found = {(c["kind"], c["path"]): c for c in out["problems"]}
    assert ("unseen", "f.bin") in found and "symlink" in found["unseen", "f.bin"]["detail"], out
    jam("gc", cwd=t.root, check=None)
    assert _obj(t.remote, oids["f.bin"]).is_file(), "gc removed the content of a stub moved out and linked back"
    os.unlink(t.root / "f.bin")
    os.rename(away / "f.bin", t.root / "f.bin")
    jam("checkout", "f.bin", cwd=t.root)
    assert not (t.root / "f.bin").read_bytes().startswith(b"\0" * 64)


def test_a_directory_of_stubs_moved_out_and_symlinked_back_keeps_their_content(tmp_path):
    """The same through a directory: `mv d /elsewhere; ln -s /elsewhere/d d`."""
    t, oids, _ = _moved_away(tmp_path, "d")
    out = json.loads(jam("doctor", "--fix", "--json", cwd=t.root, check=1).out)
    assert ("unseen", "d/g.bin") in {(c["kind"], c["path"]) for c in out["problems"]}, out
    jam("gc", cwd=t.root, check=None)
    assert _obj(t.remote, oids["d/g.bin"]).is_file()


def test_a_symlink_to_anything_but_that_stub_lets_the_row_go(tmp_path):
    """A symlink in place of the stub that leads to another file (not the stub, whose content
    is then nowhere): the row is stale and --fix forgets it, as for a removed stub."""
    t, oids, away = _moved_away(tmp_path, "f.bin")
    os.unlink(away / "f.bin")
    (away / "f.bin").write_bytes(b"something else\n")
    out = json.loads(jam("doctor", "--fix", "--json", cwd=t.root, check=None).out)
    assert ("catalog-stale", "f.bin", True) in {(c["kind"], c["path"], c["fixed"]) for c in out["problems"]}, out

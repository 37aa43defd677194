"""The dir backend: bounded fetches, full disks named right (local or remote), a remote that
fills up mid-stash, sparse files kept sparse, stale temporary uploads cleaned and nothing
else (issue 8, brief H1). Real files, real tmpfs mounts, the real `jam` command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import jam_dir
from jam_core.errors import IntegrityError, JamError, RemoteError
from jam_core.fs import part_name
from jam_core.manager import make_plugin_manager
from jam_core.model import Remote, Session
from jam_core.objects import hash_file, object_relpath
from jam_core.ops.remotes import add_remote
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, jam, make_tree, objects_verify


@pytest.fixture
def tmpfs():
    """``mount(dir, size)``: a real small tmpfs at ``dir`` (root only), unmounted at the end."""
    mounted = []

    def mount(d: Path, size: str) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                             capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=True)


def stored(tmp_path, data: bytes) -> tuple[Remote, str, Path]:
    """A dir remote holding one object with ``data``. Returns (remote, oid, object path)."""
    loc = tmp_path / "remote"
    (loc / "objects").mkdir(parents=True)
    (loc / "tmp").mkdir()
    src = tmp_path / "src"
    src.write_bytes(data)
    oid, size = hash_file(src)
    remote = Remote(name="r", kind="dir", url=str(loc), location=str(loc))
    with Session() as s:
        assert jam_dir.stash(remote=remote, oid=oid, source=src, size=size, session=s) is True
    return remote, oid, loc / "objects" / object_relpath(oid)


# -- 3. fetches are bounded by the stub's size ------------------------------------------------

@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_fetch_refuses_an_object_of_the_wrong_size_before_copying(tmp_path, change):
    data = os.urandom(100_000)
    remote, oid, obj = stored(tmp_path, data)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        if change == "longer":
            f.seek(0, 2)
            f.write(b"x" * (1 << 20))  # a wrong object that would fill the local disk
        else:
            f.truncate(50_000)
    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    with Session() as s, pytest.raises(IntegrityError, match="corrupt") as exc:
        jam_dir.fetch(remote=remote, oid=oid, dest=dest, size=len(data), session=s)
    assert not isinstance(exc.value, RemoteError)  # that object's problem, not the remote's
    assert dest.stat().st_size == 0


def test_copy_never_reads_past_the_expected_size(tmp_path):
    """An object that grows after it was checked: the copy stops at ``size``."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a" * 10_000 + b"b" * 10_000)
    dst.write_bytes(b"")
    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    moved = []
    try:
        jam_dir._copy(fs, fd, 10_000, moved.append)
    finally:
        os.close(fs)
        os.close(fd)
    assert dst.read_bytes() == b"a" * 10_000
    assert sum(moved) == 10_000, "bytes past the expected size were copied (then cut off)"


def test_checkout_of_a_stub_whose_object_grew_leaves_the_stub(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "f", 200_000, 3)
    jam("stash", "f", cwd=t.root)
    (obj,) = objects_verify(t.remote)
    os.chmod(obj, 0o644)
    with open(obj, "ab") as f:
        f.write(b"\0" * (4 << 20))
    res = jam("checkout", "f", cwd=t.root, check=1)
    assert "corrupt" in res.err and "vault" in res.err
    assert is_stub(t.root / "f")
    assert not [p for p in t.root.iterdir() if p.name.startswith(".jam-")]


def test_local_disk_full_during_fetch_names_the_local_disk(tmp_path, tmpfs):
    data = os.urandom(600_000)
    remote, oid, _ = stored(tmp_path, data)
    local = tmpfs(tmp_path / "local", "256k")
    dest = local / "dest"
    dest.write_bytes(b"")
    with Session() as s, pytest.raises(JamError) as exc:
        jam_dir.fetch(remote=remote, oid=oid, dest=dest, size=len(data), session=s)
    msg = str(exc.value)
    assert f"no space left on the local disk ({local})" in msg, msg
    assert "remote's disk" not in msg and not isinstance(exc.value, RemoteError)


def test_remote_disk_full_during_store_names_the_remote_disk(tmp_path, tmpfs):
    loc = tmpfs(tmp_path / "remote", "256k")
    (loc / "objects").mkdir()
    (loc / "tmp").mkdir()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(600_000))
    oid, size = hash_file(src)
    remote = Remote(name="usb", kind="dir", url=str(loc), location=str(loc))
    with Session() as s, pytest.raises(JamError) as exc:
        jam_dir.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    msg = str(exc.value)
    assert f"no space left on the remote's disk ({loc})" in msg and "'usb'" in msg, msg
    assert not isinstance(exc.value, RemoteError)  # this object fails, the run goes on
    assert list((loc / "tmp").iterdir()) == []


# -- 4. a remote that fills up mid-stash --------------------------------------------------------

def test_remote_fills_up_mid_stash_what_fits_is_stashed(tmp_path, tmpfs):
    root = tmp_path / "root"
    root.mkdir()
    Root.init(root)
    usb = tmpfs(tmp_path / "usb", "1m")
    add_remote(Root(root), make_plugin_manager(), "usb", str(usb))
    digests = {}
    for i in range(3):
        make_file(root / f"f{i}", 400 * 1024, seed=10 + i)
        digests[f"f{i}"] = b3(root / f"f{i}")
    res = jam("stash", ".", cwd=root, check=1)
    stubs = [n for n in digests if is_stub(root / n)]
    local = [n for n in digests if not is_stub(root / n)]
    assert stubs and local, (stubs, local, res.out, res.err)
    assert "no space left on the remote's disk" in res.err, res.err
    for n in local:
        assert b3(root / n) == digests[n] and n in res.err
    assert sorted(p.name for p in objects_verify(usb)) == sorted(digests[n] for n in stubs)
    assert list((usb / "tmp").iterdir()) == [], "an orphan temporary upload was left on the remote"
    for n in stubs:  # and what was stashed comes back
        jam("checkout", n, cwd=root)
        assert b3(root / n) == digests[n]


# -- 5. sparse files stay sparse ----------------------------------------------------------------

def test_a_sparse_file_stays_sparse_on_the_remote_and_after_checkout(tmp_path):
    t = make_tree(tmp_path)
    f = t.root / "disk.img"
    with open(f, "wb") as fh:
        fh.truncate(512 << 20)
        fh.seek(100 << 20)
        fh.write(os.urandom(4096))
    if os.stat(f).st_blocks * 512 > 1 << 20:
        pytest.skip("this filesystem does not keep holes")
    digest = b3(f)
    jam("stash", "disk.img", cwd=t.root)
    assert is_stub(f)
    (obj,) = objects_verify(t.remote)
    assert os.stat(obj).st_size == 512 << 20
    assert os.stat(obj).st_blocks * 512 <= 1 << 20, "the remote copy lost its holes"
    jam("checkout", "disk.img", cwd=t.root)
    assert os.stat(f).st_size == 512 << 20 and b3(f) == digest
    assert os.stat(f).st_blocks * 512 <= 1 << 20, "the checked-out file lost its holes"


def test_a_file_ending_in_a_hole_keeps_its_size(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as fh:
        fh.write(b"head")
        fh.truncate(3 << 20)
    dst.write_bytes(b"")
    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        jam_dir._copy(fs, fd, 3 << 20, lambda n: None)
    finally:
        os.close(fs)
        os.close(fd)
    assert dst.stat().st_size == 3 << 20 and b3(dst) == b3(src)


# -- 6. stale temporary uploads ------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_parts_are_removed_at_the_first_store_and_nothing_else(tmp_path):
    t = make_tree(tmp_path)
    tmp = t.remote / "tmp"
    mine = part_name()  # <host>.<pid>.<random>.part
    host, _, rnd = mine[: -len(".part")].split(".")
    dead = tmp / f"{host}.{dead_pid()}.{rnd}.part"
    alive = tmp / f"{host}.1.{rnd}.part"  # pid 1 lives
    notes = tmp / "notes.part"  # a user's file that only looks like ours
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    link = tmp / f"{host}.{dead_pid()}.0123456789abcdef.part"
    old_jam = tmp / f"{'ab' * 16}.part"  # an older jam's upload, a month old: stale
    for p in (dead, alive, notes, old_jam):
        p.write_bytes(b"x" * 100)
    old = 1_000_000_000  # 2001: far older than any transfer takes
    os.utime(notes, (old, old))
    os.utime(old_jam, (old, old))
    link.symlink_to(outside)
    make_file(t.root / "f", 100_000, 4)
    jam("stash", "f", cwd=t.root)
    assert not dead.exists(), "a part left by a dead jam of this host was kept"
    assert not old_jam.exists(), "an upload older than any transfer was kept"
    assert alive.exists() and notes.exists() and os.path.islink(link)
    assert outside.read_bytes() == b"keep me"


def test_uploads_use_part_names(tmp_path, monkeypatch):
    t = make_tree(tmp_path)
    make_file(t.root / "f", 100_000, 5)
    seen = []
    real = os.rename

    def rename(src, dst, *a, **kw):
        seen.append(Path(src).name)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    remote = Root(t.root).remotes()[0]
    oid, size = hash_file(t.root / "f")
    with Session() as s:
        jam_dir.stash(remote=remote, oid=oid, source=t.root / "f", size=size, session=s)
    host = part_name().split(".")[0]
    assert seen and seen[0].startswith(f"{host}.{os.getpid()}.") and seen[0].endswith(".part"), seen

"""The backend conformance kit (jam_core.testing.backend) run on the built-in backends.

``TestDirBackend``: a ``dir`` remote on a small tmpfs (so a full disk is real ENOSPC).
``TestSftpBackend``: an ``sftp`` remote on a real OpenSSH server (tests/sshd.py) whose store is
a small tmpfs; taken down by killing the server, hidden by renaming the store.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from jam_core import hookimpl
from jam_core.errors import JamError, RemoteError
from jam_core.fs import part_name
from jam_core.manager import make_plugin_manager
from jam_core.model import Remote
from jam_core.objects import MARKER_NAME, marker_bytes, new_remote_id, object_relpath
from jam_core.testing.backend import BackendConformance
from tests.conftest_sshd import sftp_remote_for

STORE_SIZE = "32m"


def _tmpfs(mnt: Path) -> None:
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_SIZE}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:  # root is required (CI runs as root): never skip silently
        pytest.fail(f"cannot mount a tmpfs at {mnt}: {r.stderr!r} (the conformance tests need root)")


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _flip(path: Path) -> None:
    """Flip bytes of a file in place, keeping its size (objects are read-only: we are root)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for at in sorted({0, size // 2, size - 1}):
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))


def _fill(store: Path, leave: int = 1024 * 1024) -> None:
    """Allocate all but ``leave`` bytes of the file system holding ``store``."""
    st = os.statvfs(store)
    free = st.f_bavail * st.f_frsize
    fd = os.open(store / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(free - leave, 1))
    finally:
        os.close(fd)


class _OnDisk:
    """Fault hooks for a backend whose objects sit in a local directory ``self.store``."""

    store: Path

    def corrupt_object(self, remote, oid):
        _flip(self.store / "objects" / object_relpath(oid))

    def remove_object(self, remote, oid):
        (self.store / "objects" / object_relpath(oid)).unlink()

    def hide_location(self, remote):
        self.store.rename(self.store.with_name("hidden"))

    def unhide_location(self, remote):
        if os.path.lexists(self.store):  # re-created meanwhile (the case fails): set it aside
            self.store.rename(self.store.with_name("recreated"))
        self.store.with_name("hidden").rename(self.store)

    def location_exists(self, remote):
        return os.path.lexists(self.store)

    def fill_up(self, remote):
        _fill(self.store)

    def list_tmp(self, remote):
        return sorted(os.listdir(self.store / "tmp"))

    def put_tmp(self, remote, name, data):
        (self.store / "tmp" / name).write_bytes(data)

    def write_marker(self, remote, data):
        marker = self.store / MARKER_NAME
        marker.unlink(missing_ok=True)
        if data is not None:
            marker.write_bytes(data)

    def put_meta_oddity(self, remote, name, what):
        put_meta_oddity(self.store, name, what)

    def hold_meta(self, remote, name):
        return open(self.store / "meta" / name, "rb")


def put_meta_oddity(store: Path, name: str, what: str) -> None:
    """The kit's ``put_meta_oddity`` for a store on a local disk (dir, sftp, rclone's sftp)."""
    path = store / "meta" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    outside = store.parent / "outside"
    outside.mkdir(exist_ok=True)
    if what == "symlink":
        (outside / "secret").write_bytes(b"secret")
        path.symlink_to(outside / "secret")
    elif what == "symlink_dir":
        (outside / "x").write_bytes(b"secret")
        path.symlink_to(outside)
    elif what == "dir":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "huge":
        with open(path, "wb") as f:
            f.truncate((256 << 20) + 1)
    else:
        raise NotImplementedError(what)


def make_pm():
    return make_plugin_manager(load_entrypoints=False)


def pm_factory(remote: Remote):
    """The kill-mid-transfer cases' child builds its plugin manager here."""
    return make_pm(), remote


class TestDirBackend(_OnDisk, BackendConformance):
    factory = "tests.test_conformance:pm_factory"

    @pytest.fixture
    def pm(self):
        return make_pm()

    @pytest.fixture
    def remote(self, pm, tmp_path):
        with self.dir_remote(pm, tmp_path) as remote:
            yield remote

    @contextmanager
    def dir_remote(self, pm, tmp_path):
        mnt = tmp_path / "disk"
        _tmpfs(mnt)
        self.store = mnt / "store"
        self.store.mkdir()
        remote = Remote(name="near", kind="dir", url=str(self.store), location=str(self.store))
        try:
            self.set_up(pm, remote)
            yield remote
        finally:
            _umount(mnt)

    # the drive is unplugged: its directory is gone
    take_down = _OnDisk.hide_location
    bring_back = _OnDisk.unhide_location


class TestSftpBackend(_OnDisk, BackendConformance):
    factory = "tests.test_conformance:pm_factory"

    @pytest.fixture
    def pm(self):
        return make_pm()

    @pytest.fixture
    def remote(self, pm, sshd, tmp_path):
        self.sshd = sshd
        mnt = tmp_path / "server-disk"
        _tmpfs(mnt)
        self.store = mnt / "store"
        self.store.mkdir()
        remote = sftp_remote_for(f"sftp://{sshd.alias}{self.store}")
        try:
            self.set_up(pm, remote)
            yield remote
        finally:
            sshd.kill()  # its sessions may hold files on the tmpfs
            _umount(mnt)

    def take_down(self, remote):  # the server dies (with every session it forked)
        self.sshd.kill()

    def bring_back(self, remote):
        self.sshd.start()


# -- the kit itself is checked: each case fails on a backend that breaks its rule -----------------
# ``Faulty`` answers before jam_dir (pluggy calls the plugin registered last first) and breaks one
# rule, chosen by $JAM_TEST_FAULT (inherited by the kill cases' child process); for every other
# call it answers None and jam_dir does the work.

FAULT = "JAM_TEST_FAULT"


def _object(remote, oid) -> Path:
    return Path(remote.location) / "objects" / object_relpath(oid)


class Faulty:
    @hookimpl
    def stash(self, remote, oid, source, size, session):
        fault = os.environ.get(FAULT)
        final = _object(remote, oid)
        if fault == "trust_existing" and final.exists():  # existing object taken on its name
            return True
        if fault == "no_verify":  # stored under the id it was given, never hashed
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, final)
            return True
        if fault == "in_place":  # written straight under its final name
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as src, open(final, "wb") as dst:
                dst.truncate(size)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    dst.flush()
                    session.progress(len(chunk))
            return True
        if fault == "leave_tmp":  # a copy of the upload left behind
            (Path(remote.location) / "tmp" / part_name()).write_bytes(b"x")
        if fault == "sweep_all":  # every name in tmp/ taken for a stale part
            for name in os.listdir(Path(remote.location) / "tmp"):
                os.unlink(Path(remote.location) / "tmp" / name)
        if fault == "recreate":  # a vanished location made again
            Path(remote.location, "objects").mkdir(parents=True, exist_ok=True)
        if fault == "nofollow_source":  # /proc/self/fd/N is a symlink: refused
            os.close(os.open(source, os.O_RDONLY | os.O_NOFOLLOW))
        if fault == "full_is_remote":  # a full disk fails the whole remote
            import jam_dir

            try:
                return jam_dir.stash(remote=remote, oid=oid, source=source, size=size, session=session)
            except RemoteError:
                raise
            except JamError as exc:
                raise RemoteError(str(exc)) from None
        return None

    @hookimpl
    def fetch(self, remote, oid, dest, size, session):
        fault = os.environ.get(FAULT)
        if fault == "fetch_unbounded" and _object(remote, oid).exists():  # the whole object, whatever size says
            shutil.copyfile(_object(remote, oid), dest)
            return True
        if fault == "gone_is_missing" and not os.path.isdir(remote.location):  # "not there", not "unreachable"
            return False
        if fault == "missing_raises" and not _object(remote, oid).exists():
            raise RemoteError(f"remote {remote.name!r}: no {oid}")
        return None

    @hookimpl
    def has(self, remote, oid, size):
        if os.environ.get(FAULT) == "has_any_size":  # the name is enough
            return _object(remote, oid).exists()
        return None

    @hookimpl
    def remote_id(self, remote, session, create):
        fault = os.environ.get(FAULT)
        if fault == "marker_rewritten" and create:  # a second create replaces the marker
            rid = new_remote_id()
            (Path(remote.location) / MARKER_NAME).write_bytes(marker_bytes(rid))
            return rid
        if fault == "garbage_marker_ok":
            import jam_dir

            try:
                return jam_dir.remote_id(remote=remote, session=session, create=create)
            except RemoteError:
                return ""
        return None


    @hookimpl
    def remove(self, remote, oid, session):
        if os.environ.get(FAULT) == "remove_gone_is_absent" and not os.path.isdir(remote.location):
            return False  # "unknown" answered as "absent"
        return None

    @hookimpl
    def write_meta(self, remote, name, data, session):
        fault = os.environ.get(FAULT)
        if fault == "meta_any_name" and not re.match(r"\A[a-z0-9][a-z0-9._/-]*\Z", name or "x"):
            return True  # a hostile name accepted (and, here, harmlessly dropped)
        if fault == "meta_in_place" and os.path.isdir(remote.location):  # truncated and rewritten
            path = Path(remote.location, "meta", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "r+b" if path.exists() else "wb") as f:
                    f.truncate(0)
                    f.write(data)
            except OSError as exc:
                raise RemoteError(f"remote {remote.name!r}: {exc.strerror}") from None
            return True
        return None

    @hookimpl
    def read_meta(self, remote, name, session):
        fault = os.environ.get(FAULT)
        if fault == "meta_unknown_is_absent" and not os.path.isdir(remote.location):
            return False
        path = Path(remote.location, "meta", name)
        if fault == "meta_follows" and name.startswith("refs/") and path.is_symlink():
            return path.read_bytes()
        return None

    @hookimpl
    def list_meta(self, remote, prefix, session):
        top = Path(remote.location, "meta", prefix)
        if os.environ.get(FAULT) == "meta_lists_regular" and prefix == "refs" and top.is_dir():
            return sorted(f"{prefix}/{n}" for n in os.listdir(top) if (top / n).is_file() and not (top / n).is_symlink())
        return None

    @hookimpl
    def free_space(self, remote, session):
        if os.environ.get(FAULT) == "free_unbounded":
            return 1 << 50
        return None


def faulty_factory(remote: Remote):
    return make_plugin_manager(load_entrypoints=False, extra=(Faulty(),)), remote


class _FaultyDirKit(TestDirBackend):  # not collected: run case by case below
    factory = "tests.test_conformance:faulty_factory"


@pytest.mark.parametrize("fault, case, why", [
    ("has_any_size", "test_round_trip", "has() says 1 bytes are held as 2"),
    ("gone_is_missing", "test_remote_gone", "DID NOT RAISE <class 'jam_core.errors.RemoteError'>"),
    ("trust_existing", "test_corrupt_existing_object_is_not_trusted", "fetched back 65536 bytes that are not its content"),
    ("no_verify", "test_content_not_matching_its_id_is_refused", "DID NOT RAISE <class 'jam_core.errors.IntegrityError'>"),
    ("fetch_unbounded", "test_fetch_with_a_wrong_size_fails_that_item", "answered True"),
    ("missing_raises", "test_missing_object_is_false", "fetch of an unknown object answered RemoteError"),
    ("recreate", "test_vanished_location_is_never_recreated", "DID NOT RAISE <class 'jam_core.errors.RemoteError'>"),
    ("full_is_remote", "test_full_remote_fails_that_object_only", "a full disk failed the whole remote"),
    ("in_place", "test_killed_mid_stash", "fetched back 4194304 bytes that are not its content"),
    ("leave_tmp", "test_temporary_names", "parts of this process left in tmp/"),
    ("no_sweep", "test_temporary_names", "a part of a dead jam was not swept"),
    ("no_sweep", "test_killed_mid_stash", "the killed jam's part was not swept"),
    ("sweep_all", "test_temporary_names", "not provably a stale part was removed"),
    ("marker_rewritten", "test_remote_id_marker", "a second create changed the id"),
    ("garbage_marker_ok", "test_remote_id_marker", "DID NOT RAISE <class 'jam_core.errors.RemoteError'>"),
    ("nofollow_source", "test_proc_self_fd_paths", "Too many levels of symbolic links"),
    ("remove_gone_is_absent", "test_remove", "answered 'False' instead of raising"),
    ("meta_in_place", "test_meta_replace_is_atomic", "not an atomic replace"),
    ("meta_in_place", "test_meta_failed_write_keeps_the_old", "damaged the old content"),
    ("meta_any_name", "test_meta_hostile_names", "instead of raising"),
    ("meta_unknown_is_absent", "test_meta_remote_gone", "answered 'False' instead of raising"),
    ("meta_follows", "test_meta_odd_entries", "answered \"b'secret'\" instead of raising"),
    ("meta_lists_regular", "test_meta_odd_entries", "left out an entry it cannot read"),
    ("free_unbounded", "test_free_space", "free_space of a full remote"),
])
def test_the_kit_catches(fault, case, why, tmp_path, monkeypatch):
    """Each case of the kit fails, for the reason it names, on a dir backend with exactly one
    rule broken (and passes on jam_dir as it is: TestDirBackend)."""
    if fault == "no_sweep":
        import jam_dir

        monkeypatch.setattr(jam_dir, "_clean_parts", lambda *args: None)
    kit = _FaultyDirKit()
    pm, _ = faulty_factory(None)
    with kit.dir_remote(pm, tmp_path) as remote:
        monkeypatch.setenv(FAULT, fault)
        try:
            getattr(kit, case)(pm, remote, tmp_path)
        except pytest.skip.Exception as exc:
            pytest.fail(f"{case} skipped: {exc}")
        except (Exception, pytest.fail.Exception) as exc:
            assert why in str(exc), f"{case} failed for another reason: {exc}"
            return
    pytest.fail(f"{case} passed on a backend with the fault {fault!r}")

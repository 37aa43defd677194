"""The backend conformance kit (jam_core.testing.backend) run on the built-in backends.

``TestDirBackend``: a ``dir`` remote on a small tmpfs (so a full disk is real ENOSPC).
``TestSftpBackend``: an ``sftp`` remote on a real OpenSSH server (tests/sshd.py) whose store is
a small tmpfs; taken down by killing the server, hidden by renaming the store.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.model import Remote
from jam_core.objects import MARKER_NAME, object_relpath
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

    @pytest.mark.xfail(strict=True, reason=(
        "jam_dir.fetch answers False (\"does not have it\") once the directory it checked at the "
        "start of the command is gone; it should raise RemoteError (the fix is in the report of issue 9)"))
    def test_remote_gone_mid_command(self, pm, remote, tmp_path):
        super().test_remote_gone_mid_command(pm, remote, tmp_path)


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

    @pytest.mark.xfail(strict=True, reason=(
        "jam_sftp: a server that refuses the connection is reported as \"jamtest (user@host:port) refused "
        "the connection\", without the remote's name (the fix is in the report of issue 9)"))
    def test_errors_name_the_remote(self, pm, remote, tmp_path):
        super().test_errors_name_the_remote(pm, remote, tmp_path)

"""The backend conformance kit (jam_core.testing.backend) on the ``rclone`` backend, against a
real S3 server (SeaweedFS ``weed mini``, tests/seaweed.py) reached through rclone's s3 backend.

Each test gets a new bucket; the remote lives at ``seaweed:BUCKET/store``. Faults are injected
behind jam's back with the rclone CLI (corrupt, remove, put a part in ``tmp/``, rewrite the
marker); the server is taken down by killing ``weed`` (and started again on the same ports and
data); the location is hidden by moving the bucket's content to another bucket and removing the
bucket (an S3 location that vanished: jam must not re-create it). ``fill_up`` skips: an S3 server
has no small disk to fill (SeaweedFS preallocates volumes of its own size; a full volume server
is not something a test can bring about cheaply and surely).
"""

from __future__ import annotations

import os

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.model import Remote
from jam_core.objects import MARKER_NAME, object_relpath
from jam_core.testing.backend import BackendConformance
from tests.conftest_seaweed import rclone_remote_for


def make_pm():
    return make_plugin_manager(load_entrypoints=False)


def factory(remote: Remote):
    """The kill-mid-transfer cases' child builds its plugin manager here (it inherits the env)."""
    return make_pm(), remote


class TestRcloneBackend(BackendConformance):
    factory = "tests.test_conformance_rclone:factory"

    @pytest.fixture
    def pm(self):
        return make_pm()

    @pytest.fixture
    def remote(self, pm, rclone_env, s3_bucket):
        self.server = rclone_env
        self.bucket = s3_bucket
        self.top = f"seaweed:{s3_bucket}/store"
        remote = rclone_remote_for(self.top)
        self.set_up(pm, remote)
        yield remote
        if self.server.proc is None:
            self.server.start()

    # -- fault injection behind jam's back (the rclone CLI) -------------------------------------

    def _obj(self, oid: str) -> str:
        return f"{self.top}/objects/{object_relpath(oid)}"

    def corrupt_object(self, remote, oid):
        data = bytearray(self.server.rclone("cat", self._obj(oid)).stdout)
        for at in sorted({0, len(data) // 2, len(data) - 1}):
            data[at] ^= 0xFF
        self.server.rclone("rcat", self._obj(oid), input=bytes(data))

    def remove_object(self, remote, oid):
        self.server.rclone("deletefile", self._obj(oid))

    def take_down(self, remote):
        self.server.kill()

    def bring_back(self, remote):
        if self.server.proc is None:
            self.server.start()

    def hide_location(self, remote):
        b = self.bucket
        self.server.rclone("mkdir", f"seaweed:{b}-hidden")
        self.server.rclone("move", f"seaweed:{b}", f"seaweed:{b}-hidden")
        self.server.rclone("purge", f"seaweed:{b}")

    def unhide_location(self, remote):
        b = self.bucket
        if self.location_exists(remote):  # re-created meanwhile (the case fails): set it aside
            self.server.rclone("purge", f"seaweed:{b}")
        self.server.rclone("mkdir", f"seaweed:{b}")
        self.server.rclone("move", f"seaweed:{b}-hidden", f"seaweed:{b}")

    def location_exists(self, remote):
        return self.server.bucket_exists(self.bucket)

    def fill_up(self, remote):
        pytest.skip("an S3 server cannot be filled up cheaply and surely (SeaweedFS grows its volumes); "
                    "a full remote is an item's JamError by the messages rclone gives (store.py _FULL)")

    def list_tmp(self, remote):
        out = self.server.rclone("lsf", f"{self.top}/tmp", check=False)
        return sorted(n for n in out.stdout.decode().splitlines() if n)

    def put_tmp(self, remote, name, data):
        self.server.rclone("rcat", f"{self.top}/tmp/{name}", input=data)

    def write_marker(self, remote, data):
        if data is None:
            self.server.rclone("deletefile", f"{self.top}/{MARKER_NAME}")
        else:
            self.server.rclone("rcat", f"{self.top}/{MARKER_NAME}", input=data)


class TestRcloneBackendLargeObjects(TestRcloneBackend):
    """The kit again with every object of 1 MiB or more fetched by rclone's own copy into the
    file jam holds (Store._get_large, the path of objects of 64 MiB and more)."""

    @pytest.fixture(autouse=True)
    def _large_from_1_mib(self, monkeypatch):
        import jam_rclone.store

        monkeypatch.setattr(jam_rclone.store, "LARGE", 1 << 20)


class TestRcloneSftpBackend(BackendConformance):
    """The kit on an rclone remote of type sftp (a real OpenSSH server, tests/sshd.py): a backend
    that can move on the server, so uploads go to ``tmp/<part_name()>`` and are moved into place
    (``operations/movefile``), the path object stores never take. Faults are injected on the
    server's disk, as for jam's own sftp backend; ``fill_up`` skips (the sftp backend's own kit
    covers a full disk; rclone's sftp gives it as a plain failure)."""

    factory = "tests.test_conformance_rclone:factory"

    @pytest.fixture
    def pm(self):
        return make_pm()

    @pytest.fixture
    def remote(self, pm, sshd, tmp_path, monkeypatch):
        from pathlib import Path

        self.sshd = sshd
        self.store = tmp_path / "server" / "store"
        self.store.mkdir(parents=True)
        home = Path(os.environ["HOME"])
        for k, v in {"TYPE": "sftp", "HOST": "127.0.0.1", "PORT": str(sshd.port), "USER": sshd.user,
                     "KEY_FILE": str(sshd.client_key), "KNOWN_HOSTS_FILE": str(home / ".ssh" / "known_hosts")}.items():
            monkeypatch.setenv(f"RCLONE_CONFIG_SSHTEST_{k}", v)
        monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "no-rclone.conf"))
        monkeypatch.setenv("RCLONE_LOW_LEVEL_RETRIES", "1")
        monkeypatch.setenv("RCLONE_CONTIMEOUT", "5s")
        remote = rclone_remote_for(f"sshtest:{self.store}")
        self.set_up(pm, remote)
        yield remote
        sshd.kill()

    def _obj(self, oid):
        return self.store / "objects" / object_relpath(oid)

    def corrupt_object(self, remote, oid):
        p = self._obj(oid)
        data = bytearray(p.read_bytes())
        for at in sorted({0, len(data) // 2, len(data) - 1}):
            data[at] ^= 0xFF
        p.write_bytes(bytes(data))

    def remove_object(self, remote, oid):
        self._obj(oid).unlink()

    def take_down(self, remote):
        self.sshd.kill()

    def bring_back(self, remote):
        self.sshd.start()

    def hide_location(self, remote):
        self.store.rename(self.store.with_name("hidden"))

    def unhide_location(self, remote):
        if os.path.lexists(self.store):
            self.store.rename(self.store.with_name("recreated"))
        self.store.with_name("hidden").rename(self.store)

    def location_exists(self, remote):
        return os.path.lexists(self.store)

    def fill_up(self, remote):
        pytest.skip("not simulated for rclone's sftp (jam's own sftp kit fills a tmpfs)")

    def list_tmp(self, remote):
        return sorted(os.listdir(self.store / "tmp"))

    def put_tmp(self, remote, name, data):
        (self.store / "tmp" / name).write_bytes(data)

    def write_marker(self, remote, data):
        m = self.store / MARKER_NAME
        m.unlink(missing_ok=True)
        if data is not None:
            m.write_bytes(data)

    def put_meta_oddity(self, remote, name, what):
        from tests.test_conformance import put_meta_oddity

        put_meta_oddity(self.store, name, what)

    @pytest.mark.xfail(strict=True, reason="LIMIT (R8): rclone's listings hide symlinks and special files "
                       "by design (daemon.py NO_LINKS) and list files only: an odd meta/refs/ entry on an "
                       "rclone sftp remote is not listed, so gc and drop do not stop for it")
    def test_meta_odd_entries(self, pm, remote, tmp_path):
        super().test_meta_odd_entries(pm, remote, tmp_path)

    def hold_meta(self, remote, name):
        return open(self.store / "meta" / name, "rb")

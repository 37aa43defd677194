"""The sftp backend through its hooks, against a real OpenSSH server (tests/sshd.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jam_core.errors import IntegrityError, RemoteError, UsageError
from jam_core.manager import make_plugin_manager
from jam_core.model import Remote, Session
from jam_core.objects import hash_file, object_relpath, verify_file
from tests.conftest import make_file
from tests.conftest_sshd import sftp_remote_for
from tests.sshd import SSHD


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def stash(pm, remote: Remote, path: Path, session: Session) -> tuple[str, int]:
    oid, size = hash_file(path)
    assert pm.hook.stash(remote=remote, oid=oid, source=path, size=size, session=session) is True
    return oid, size


def fetch(pm, remote: Remote, oid: str, size: int, dest: Path, session: Session) -> bool:
    dest.write_bytes(b"")
    return pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=session)


def stored(store: Path, oid: str) -> Path:
    return store / "objects" / object_relpath(oid)


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "tmp").iterdir())


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- URLs (no server) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, location",
    [
        ("sftp://host/srv/jam", "sftp://host/srv/jam"),
        ("sftp://me@host:2222/srv/jam/", "sftp://me@host:2222/srv/jam"),
        ("SFTP://host/~/jam", "sftp://host/~/jam"),
        ("sftp://[::1]:22/x", "sftp://[::1]:22/x"),
        ("sftp://alias/", "sftp://alias/"),
    ],
)
def test_parse_url(pm, url, location):
    assert pm.hook.parse_url(url=url) == {"kind": "sftp", "location": location}


@pytest.mark.parametrize(
    "url, message",
    [
        ("sftp://me:secret@host/x", "never stores passwords"),
        ("sftp:///srv/jam", "no host"),
        ("sftp://host", "no path"),
        ("sftp://host:99999/x", "bad sftp URL"),
        ("sftp://host:abc/x", "bad sftp URL"),
        ("sftp://host/a/../b", "'..'"),
        ("sftp://host/x?y=1", "'?'"),
        ("sftp://host/~bob/x", "~user"),
    ],
)
def test_parse_url_refuses_malformed(pm, url, message):
    with pytest.raises(UsageError, match=message.replace("?", r"\?").replace(".", r"\.")):
        pm.hook.parse_url(url=url)


def test_paths_relative_to_home():
    from jam_sftp.url import parse

    assert parse("sftp://h/~/jam").path == "jam"
    assert parse("sftp://h/~").path == "."
    assert parse("sftp://h/srv/jam").path == "/srv/jam"
    assert parse("rsync://h/x") is None and parse("/some/dir") is None


def test_import_does_not_load_paramiko():
    code = "import sys, jam_sftp; from jam_core.manager import make_plugin_manager; make_plugin_manager(); " \
        "assert 'paramiko' not in sys.modules, 'paramiko imported at startup'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- round trips ----------------------------------------------------------------------------------


def test_check_remote_creates_layout_and_describes(pm, sshd, sftp_store):
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")
    with Session() as s:
        text = pm.hook.check_remote(remote=remote, session=s, create=True)
    assert (sftp_store / "objects").is_dir() and (sftp_store / "tmp").is_dir()
    assert leftovers(sftp_store) == []  # the write probe is gone
    assert text.startswith("sftp jamtest (") and f"127.0.0.1:{sshd.port}" in text
    assert "OpenSSH" in text and "writable" in text and str(sftp_store) in text


def test_check_remote_without_create_refuses_missing_layout(pm, sshd, sftp_store):
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=remote, session=s, create=False)
    assert "objects is missing" in one_line(exc)
    assert not (sftp_store / "objects").exists()


@pytest.mark.parametrize("size", [0, 1, 255 * 1024, 255 * 1024 + 1, 3 * 1024 * 1024 + 17])
def test_round_trip(pm, sftp_remote, sftp_store, tmp_path, size):
    data = make_file(tmp_path / "f", size, seed=size)
    with Session() as s:
        oid, n = stash(pm, sftp_remote, tmp_path / "f", s)
        assert stored(sftp_store, oid).read_bytes() == data
        assert pm.hook.has(remote=sftp_remote, oid=oid, size=n, session=s) is True
        assert fetch(pm, sftp_remote, oid, n, tmp_path / "back", s) is True
    assert (tmp_path / "back").read_bytes() == data
    assert leftovers(sftp_store) == []


def test_progress_counts_every_byte(pm, sftp_remote, tmp_path):
    make_file(tmp_path / "f", 2_000_000)
    seen = []
    with Session(progress=seen.append) as s:
        oid, n = stash(pm, sftp_remote, tmp_path / "f", s)
        assert sum(seen) == n
        seen.clear()
        fetch(pm, sftp_remote, oid, n, tmp_path / "back", s)
        assert sum(seen) == n


def test_absent_object(pm, sftp_remote, tmp_path):
    oid = "b3:" + "0" * 64
    with Session() as s:
        assert fetch(pm, sftp_remote, oid, 5, tmp_path / "back", s) is False
        assert pm.hook.has(remote=sftp_remote, oid=oid, size=5, session=s) is False


def test_equal_content_is_stored_once(pm, sftp_remote, sftp_store, tmp_path):
    make_file(tmp_path / "a", 10_000, seed=7)
    make_file(tmp_path / "b", 10_000, seed=7)
    with Session() as s:
        oid_a, _ = stash(pm, sftp_remote, tmp_path / "a", s)
        oid_b, _ = stash(pm, sftp_remote, tmp_path / "b", s)
    # one object (an existing one is re-sent and renamed over, never trusted by its size: H2)
    assert oid_a == oid_b
    objects = [p for p in (sftp_store / "objects").rglob("*") if p.is_file()]
    assert objects == [stored(sftp_store, oid_a)] and leftovers(sftp_store) == []
    assert stored(sftp_store, oid_a).read_bytes() == (tmp_path / "a").read_bytes()


def test_many_small_files_one_connection(pm, sftp_remote, sftp_store, tmp_path):
    files = [tmp_path / "src" / f"{i:03}" for i in range(150)]
    datas = [make_file(f, 4096 + i, seed=i) for i, f in enumerate(files)]
    with Session() as s:
        oids = [stash(pm, sftp_remote, f, s) for f in files]
        pool = next(iter(s.cache.values()))
        assert pool._count == 1  # serial calls reuse one connection
        for (oid, n), data, f in zip(oids, datas, files):
            assert fetch(pm, sftp_remote, oid, n, f.with_suffix(".back"), s)
            assert f.with_suffix(".back").read_bytes() == data
    assert pool._count == 0  # closed with the session


def test_many_small_files_from_threads(pm, sftp_remote, sftp_store, tmp_path):
    """The hooks are thread-safe: a core that calls them from threads gets parallel transfers."""
    files = [tmp_path / "src" / f"{i:03}" for i in range(200)]
    for i, f in enumerate(files):
        make_file(f, 8192, seed=1000 + i)
    remote = sftp_remote_for(sftp_remote.url, connections=3)
    with Session() as s, ThreadPoolExecutor(8) as ex:
        oids = list(ex.map(lambda f: stash(pm, remote, f, s), files))
        pool = next(iter(s.cache.values()))
        assert 1 <= pool._count <= 3
        backs = [f.with_suffix(".back") for f in files]
        assert all(ex.map(lambda a: fetch(pm, remote, a[0][0], a[0][1], a[1], s), zip(oids, backs)))
    for f, b in zip(files, backs):
        assert f.read_bytes() == b.read_bytes()
    assert len(list((sftp_store / "objects").rglob("*"))) >= 200
    assert leftovers(sftp_store) == []


def test_tree_with_awkward_names(pm, sftp_remote, tmp_path):
    names = ["a b", "new\nline", "ünï", "x" * 200]
    with Session() as s:
        for name in names:
            p = tmp_path / "tree" / name
            data = make_file(p, 1000, seed=len(name))
            oid, n = stash(pm, sftp_remote, p, s)
            assert fetch(pm, sftp_remote, oid, n, tmp_path / "back", s)
            assert (tmp_path / "back").read_bytes() == data


def test_plain_url_with_default_identity(pm, sshd, tmp_path):
    """No ssh_config: user and port from the URL, the default ~/.ssh/id_ed25519, [host]:port."""
    home = Path(os.environ["HOME"])
    (home / ".ssh" / "config").unlink()
    store = tmp_path / "jamstore"
    store.mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{store}")
    make_file(tmp_path / "f", 1234)
    with Session() as s:
        assert "writable" in pm.hook.check_remote(remote=remote, session=s, create=True)
        oid, n = stash(pm, remote, tmp_path / "f", s)
    assert stored(store, oid).is_file()


def test_login_directory_url(pm, sshd, tmp_path):
    """``/~/dir`` is relative to the login directory (sshd's, from passwd: not the test HOME)."""
    import pwd
    import uuid

    login_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    name = f".jam-test-{uuid.uuid4().hex[:8]}"
    store = login_home / name
    store.mkdir()
    try:
        remote = sftp_remote_for(f"sftp://{sshd.alias}/~/{name}")
        make_file(tmp_path / "f", 100)
        with Session() as s:
            text = pm.hook.check_remote(remote=remote, session=s, create=True)
            assert str(store) in text
            oid, _ = stash(pm, remote, tmp_path / "f", s)
        assert stored(store, oid).is_file()
    finally:
        import shutil

        shutil.rmtree(store)


def test_hashed_known_hosts_entry(pm, sshd, sftp_remote, tmp_path):
    kh = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert kh.read_text().startswith("|1|")
    make_file(tmp_path / "f", 100)
    with Session() as s:
        stash(pm, sftp_remote, tmp_path / "f", s)


def test_proxy_jump_and_proxy_command(pm, sshd, sftp_remote, tmp_path):
    cfg = Path(os.environ["HOME"]) / ".ssh" / "config"
    ssh_opts = " ".join(sshd.ssh_options(Path(os.environ["HOME"])))
    cfg.write_text(
        cfg.read_text()
        + f"Host viajump\n    HostName 127.0.0.1\n    Port {sshd.port}\n    ProxyJump {sshd.alias}\n"
        + "    IdentityFile ~/.ssh/id_ed25519\n"
        + f"Host viacmd\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        + f"    ProxyCommand ssh {ssh_opts} -W %h:%p {sshd.alias}\n"
    )
    make_file(tmp_path / "f", 300_000)
    store = sftp_remote.location.split(sshd.alias, 1)[1]
    for alias in ("viajump", "viacmd"):
        remote = sftp_remote_for(f"sftp://{alias}{store}", name=alias)
        with Session() as s:
            oid, n = stash(pm, remote, tmp_path / "f", s)
            assert fetch(pm, remote, oid, n, tmp_path / "back", s)
        verify_file(tmp_path / "back", oid, n)


# -- trust ----------------------------------------------------------------------------------------


def host_fingerprint(sshd: SSHD) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(sshd.host_key) + ".pub"], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[1]


def test_unknown_host_key_is_refused_with_fingerprint(pm, sshd, sftp_remote, sftp_store):
    (Path(os.environ["HOME"]) / ".ssh" / "known_hosts").write_text("")
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=sftp_remote, session=s, create=False)
    text = one_line(exc)
    fp = host_fingerprint(sshd)
    assert fp.startswith("SHA256:") and fp in text
    assert "unknown host key" in text and "ssh jamtest" in text and f"ssh-keyscan -p {sshd.port} 127.0.0.1" in text
    assert (Path(os.environ["HOME"]) / ".ssh" / "known_hosts").read_text() == ""  # nothing recorded


def test_changed_host_key_is_refused(pm, sshd, sftp_remote, tmp_path):
    from tests.sshd import keygen

    other = keygen(tmp_path / "other_host_key").split()
    kh = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    kh.write_text(f"{sshd.host_pattern} {other[0]} {other[1]}\n")
    with Session() as s, pytest.raises(RemoteError) as exc:
        stash(pm, sftp_remote, make_file(tmp_path / "f", 10) and tmp_path / "f", s)
    text = one_line(exc)
    assert "HOST KEY CHANGED" in text and host_fingerprint(sshd) in text
    assert f"ssh-keygen -R '{sshd.host_pattern}'" in text


def test_key_for_port_22_does_not_vouch_for_another_port(pm, sshd, sftp_remote):
    kh = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    kh.write_text(sshd.known_hosts_line().replace(sshd.host_pattern, "127.0.0.1") + "\n")
    with Session() as s, pytest.raises(RemoteError, match="unknown host key"):
        pm.hook.check_remote(remote=sftp_remote, session=s, create=False)


def test_user_known_hosts_file_from_ssh_config(pm, sshd, sftp_remote, tmp_path):
    ssh = Path(os.environ["HOME"]) / ".ssh"
    elsewhere = tmp_path / "hosts"
    (ssh / "known_hosts").rename(elsewhere)
    (ssh / "config").write_text((ssh / "config").read_text() + f"    UserKnownHostsFile {elsewhere}\n")
    with Session() as s:
        assert "writable" in pm.hook.check_remote(remote=sftp_remote, session=s, create=True)


def test_refused_key_is_one_clear_line(pm, sshd, sftp_remote):
    sshd.authorized_keys.write_text("")
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=sftp_remote, session=s, create=False)
    text = one_line(exc)
    assert "refused authentication" in text and "jamtest" in text and "id_ed25519" in text


def test_encrypted_key_through_the_agent(pm, sshd, sftp_remote, tmp_path, monkeypatch):
    ssh = Path(os.environ["HOME"]) / ".ssh"
    key = ssh / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", "s3cret-pass", "-f", str(key)], check=True, capture_output=True)
    with Session() as s, pytest.raises(RemoteError, match="encrypted.*ssh-add"):
        pm.hook.check_remote(remote=sftp_remote, session=s, create=False)
    agent = subprocess.run(["ssh-agent", "-s"], check=True, capture_output=True, text=True).stdout
    env = dict(part.split("=", 1) for part in agent.replace(";", "\n").split() if "=" in part)
    monkeypatch.setenv("SSH_AUTH_SOCK", env["SSH_AUTH_SOCK"])
    try:
        subprocess.run(
            ["ssh-add", str(key)],
            check=True,
            capture_output=True,
            env={**os.environ, "SSH_ASKPASS": str(write_askpass(tmp_path)), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"},
            stdin=subprocess.DEVNULL,
        )
        with Session() as s:
            assert "writable" in pm.hook.check_remote(remote=sftp_remote, session=s, create=True)
    finally:
        os.kill(int(env["SSH_AGENT_PID"]), 15)


def write_askpass(tmp_path: Path) -> Path:
    script = tmp_path / "askpass"
    script.write_text("#!/bin/sh\necho s3cret-pass\n")
    script.chmod(0o700)
    return script


# -- failures -------------------------------------------------------------------------------------


def test_wrong_path(pm, sshd, tmp_path):
    remote = sftp_remote_for(f"sftp://{sshd.alias}{tmp_path}/nope")
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=remote, session=s, create=True)
    text = one_line(exc)
    assert f"{tmp_path}/nope does not exist" in text and "jamtest" in text
    assert not (tmp_path / "nope").exists()


def test_missing_layout_is_not_recreated_by_stash(pm, sshd, sftp_store, tmp_path):
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")
    make_file(tmp_path / "f", 10)
    with Session() as s, pytest.raises(RemoteError, match="objects is missing.*will not re-create"):
        stash(pm, remote, tmp_path / "f", s)
    assert list(sftp_store.iterdir()) == []


def read_only_server(sshd: SSHD, sftp_store: Path, tmp_path: Path) -> SSHD:
    """Replace the test's server by one whose sftp-server runs with -R (read-only: even root
    cannot write through it), over a store that already has its layout."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    sshd.kill()
    ro = SSHD(tmp_path / "ro", sftp_subsystem="internal-sftp -R")
    ro.write_home(Path(os.environ["HOME"]))
    ro.start()
    return ro


def test_read_only_remote(pm, sshd, sftp_store, tmp_path):
    """A read-only remote (sftp-server -R: even root cannot write through it)."""
    ro = read_only_server(sshd, sftp_store, tmp_path)
    try:
        remote = sftp_remote_for(f"sftp://{ro.alias}{sftp_store}")
        make_file(tmp_path / "f", 1000)
        with Session() as s:
            with pytest.raises(RemoteError) as exc:
                pm.hook.check_remote(remote=remote, session=s, create=True)
            assert "permission denied" in one_line(exc) and "jamtest" in one_line(exc)
            with pytest.raises(RemoteError, match="permission denied: cannot store"):
                stash(pm, remote, tmp_path / "f", s)
        assert leftovers(sftp_store) == [] and list((sftp_store / "objects").iterdir()) == []
    finally:
        ro.kill()


def test_server_down(pm, sshd, sftp_remote):
    sshd.kill()
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=sftp_remote, session=s, create=False)
    assert "refused the connection" in one_line(exc) and f"127.0.0.1:{sshd.port}" in one_line(exc)


def test_server_that_never_answers_times_out(pm, sshd, sftp_store):
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever speaks
        port = silent.getsockname()[1]
        remote = sftp_remote_for(f"sftp://127.0.0.1:{port}{sftp_store}", timeout=0.5)
        with Session() as s, pytest.raises(RemoteError) as exc:
            pm.hook.check_remote(remote=remote, session=s, create=False)
    text = one_line(exc)
    assert f"127.0.0.1:{port}" in text and ("0.5s" in text or "handshake" in text)


def test_bad_options(pm, sshd, sftp_store):
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", connections="many")
    with Session() as s, pytest.raises(UsageError, match="connections"):
        pm.hook.check_remote(remote=remote, session=s, create=False)


def test_unresolvable_host(pm, isolated_home, tmp_path):
    remote = sftp_remote_for("sftp://no-such-host.invalid/srv/jam")
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=remote, session=s, create=False)
    assert "cannot resolve host 'no-such-host.invalid'" in one_line(exc)


# -- faults mid-transfer --------------------------------------------------------------------------


class KillAfter:
    """A progress callback that kills the server once ``after`` bytes have moved (counting only
    the bytes reported from threads named ``thread*``, if given: the core's transfer worker is
    ``jam-move``, while its own thread hashes the next batch)."""

    def __init__(self, sshd: SSHD, after: int, thread: str | tuple[str, ...] = ""):
        self.sshd, self.after, self.seen, self.fired = sshd, after, 0, False
        self.thread = thread

    def __call__(self, n: int) -> None:
        if self.thread and not threading.current_thread().name.startswith(self.thread):
            return
        self.seen += n
        if not self.fired and self.seen >= self.after:
            self.fired = True
            self.sshd.kill()


def test_server_killed_mid_upload(pm, sshd, sftp_remote, sftp_store, tmp_path):
    data = make_file(tmp_path / "big", 48 * 1024 * 1024)
    oid, size = hash_file(tmp_path / "big")
    killer = KillAfter(sshd, 1)
    with Session(progress=killer) as s, pytest.raises(RemoteError) as exc:
        pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "big", size=size, session=s)
    assert killer.fired
    text = one_line(exc)
    assert "lost during transfer" in text and "jamtest" in text
    assert not stored(sftp_store, oid).exists()  # never a half object under its final name
    assert (tmp_path / "big").read_bytes() == data  # the local side is as it was
    sshd.start()
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "big", size=size, session=s)
    verify_file(stored(sftp_store, oid), oid, size)


def test_server_killed_mid_download(pm, sshd, sftp_remote, sftp_store, tmp_path):
    make_file(tmp_path / "big", 48 * 1024 * 1024)
    with Session() as s:
        oid, size = stash(pm, sftp_remote, tmp_path / "big", s)
    killer = KillAfter(sshd, 1)
    with Session(progress=killer) as s, pytest.raises(RemoteError) as exc:
        fetch(pm, sftp_remote, oid, size, tmp_path / "back", s)
    assert killer.fired and "lost during transfer" in one_line(exc)
    sshd.start()
    with Session() as s:
        assert fetch(pm, sftp_remote, oid, size, tmp_path / "back", s)
    verify_file(tmp_path / "back", oid, size)


def test_session_survives_a_restart_between_calls(pm, sshd, sftp_remote, tmp_path):
    """A broken connection is dropped from the pool; the next call opens a fresh one."""
    make_file(tmp_path / "a", 1000, seed=1)
    make_file(tmp_path / "b", 1000, seed=2)
    with Session() as s:
        stash(pm, sftp_remote, tmp_path / "a", s)
        sshd.restart()
        with pytest.raises(RemoteError, match="lost during transfer"):
            stash(pm, sftp_remote, tmp_path / "b", s)
        stash(pm, sftp_remote, tmp_path / "b", s)


def test_corrupt_object_is_caught(pm, sftp_remote, sftp_store, tmp_path):
    make_file(tmp_path / "f", 100_000)
    with Session() as s:
        oid, size = stash(pm, sftp_remote, tmp_path / "f", s)
        obj = stored(sftp_store, oid)
        obj.chmod(0o644)
        raw = bytearray(obj.read_bytes())
        raw[5000] ^= 0xFF
        obj.write_bytes(bytes(raw))
        assert fetch(pm, sftp_remote, oid, size, tmp_path / "back", s)
        with pytest.raises(IntegrityError):
            verify_file(tmp_path / "back", oid, size)  # what the core does before any rename
        obj.write_bytes(bytes(raw[:-10]))  # truncated: refused before any byte moves
        with pytest.raises(IntegrityError, match="99990 bytes, expected 100000"):
            fetch(pm, sftp_remote, oid, size, tmp_path / "back", s)


def test_verify_read_repairs_a_corrupt_object_on_stash(pm, sftp_remote, sftp_store, tmp_path):
    data = make_file(tmp_path / "f", 100_000)
    remote = sftp_remote_for(sftp_remote.url, verify="read")
    with Session() as s:
        oid, size = stash(pm, remote, tmp_path / "f", s)
        obj = stored(sftp_store, oid)
        obj.chmod(0o644)
        obj.write_bytes(b"\0" * size)  # same size, wrong bytes
        stash(pm, remote, tmp_path / "f", s)
    assert obj.read_bytes() == data


def test_file_changed_while_stored_is_refused(pm, sftp_remote, sftp_store, tmp_path):
    make_file(tmp_path / "f", 100_000)
    oid, size = hash_file(tmp_path / "f")
    make_file(tmp_path / "f", 100_000, seed=99)  # changed after hashing
    with Session() as s, pytest.raises(IntegrityError, match="changed while it was being stored"):
        pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "f", size=size, session=s)
    assert not stored(sftp_store, oid).exists() and leftovers(sftp_store) == []


# -- the host-key question on a terminal ------------------------------------------------------------

ASK = """
import sys
from jam_core.manager import make_plugin_manager
from jam_core.model import Remote, Session
url = sys.argv[1]
r = Remote(name="far", kind="sftp", url=url, location=url)
try:
    with Session() as s:
        print("RESULT", make_plugin_manager(load_entrypoints=False).hook.check_remote(remote=r, session=s, create=True))
except Exception as exc:
    print("ERROR", exc)
"""


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_terminal_asks_about_an_unknown_key(sshd, sftp_store, monkeypatch, answer):
    pexpect = pytest.importorskip("pexpect")
    kh = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    kh.write_text("")
    monkeypatch.delenv("JAM_NO_PROMPT")
    url = f"sftp://{sshd.alias}{sftp_store}"
    child = pexpect.spawn(sys.executable, ["-c", ASK, url], env=dict(os.environ), encoding="utf-8", timeout=30)
    child.expect(r"fingerprint is (SHA256:\S+)\.")
    assert child.match.group(1) == host_fingerprint(sshd)
    child.expect(r"\(yes/no\)\? ")
    child.sendline(answer)
    child.expect(["RESULT", "ERROR"])
    child.expect(pexpect.EOF)
    if answer == "yes":
        assert child.after is not None and "writable" in child.before
        recorded = kh.read_text().split()  # hashed if ssh_config says HashKnownHosts (Debian does)
        assert recorded[1:] == sshd.known_hosts_line().split()[1:]
        with Session() as s:  # recorded: no question the second time
            make_plugin_manager(load_entrypoints=False).hook.check_remote(
                remote=sftp_remote_for(url), session=s, create=False
            )
    else:
        assert "unknown host key" in child.before
        assert kh.read_text() == ""


# -- batches (stash_many / fetch_many: pipelined on one connection) --------------------------------


def batch_files(tmp_path: Path, count: int, size: int = 4096) -> list[tuple[str, Path, int]]:
    """``count`` distinct small files of varied sizes (around the request size too)."""
    from jam_sftp.transfer import REQUEST

    sizes = [1, REQUEST - 1, REQUEST, REQUEST + 1, 3 * REQUEST + 7]
    items = []
    for i in range(count):
        n = sizes[i] if i < len(sizes) else size + i
        path = tmp_path / "src" / f"f{i:04}"
        make_file(path, n, seed=1000 + i)
        oid, got = hash_file(path)
        items.append((oid, path, got))
    return items


def test_batch_round_trip(pm, sftp_remote, sftp_store, tmp_path):
    from jam_sftp.batch import PIPELINED_MAX

    items = batch_files(tmp_path, 300)
    big = tmp_path / "src" / "big"
    make_file(big, PIPELINED_MAX + 12345, seed=7)  # takes the single-file path inside the batch
    items.insert(150, (*hash_file(big)[:1], big, PIPELINED_MAX + 12345))
    with Session() as s:
        already = items[10]
        stash(pm, sftp_remote, already[1], s)  # equal content stored before: kept, reported stored
        changed_oid, changed, n = items[20]
        make_file(changed, n, seed=4242)  # changed after hashing: its hash no longer matches
        moved = []
        s2 = Session(progress=moved.append)
        with s2:
            out = list(pm.hook.stash_many(remote=sftp_remote, items=items, session=s2))
        assert sorted(oid for oid, _ in out) == sorted(oid for oid, _, _ in items)  # one answer per item
        errors = {oid: err for oid, err in out if err is not None}
        assert list(errors) == [changed_oid]
        assert isinstance(errors[changed_oid], IntegrityError) and "changed" in str(errors[changed_oid])
        assert sum(moved) >= sum(n for oid, _, n in items if oid != changed_oid) - already[2]
    assert leftovers(sftp_store) == []
    assert not stored(sftp_store, changed_oid).exists()
    for oid, _, n in items:
        if oid != changed_oid:
            verify_file(stored(sftp_store, oid), oid, n)
    # back again, with one object the remote does not have and one truncated on the server
    missing = "b3:" + "0" * 64
    trunc_oid, _, trunc_n = items[30]
    obj = stored(sftp_store, trunc_oid)
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:-1])
    wanted = [(oid, tmp_path / "back" / f"{i:04}", n) for i, (oid, _, n) in enumerate(items) if oid != changed_oid]
    wanted.append((missing, tmp_path / "back" / "missing", 10))
    (tmp_path / "back").mkdir()
    for _, dest, _ in wanted:
        dest.write_bytes(b"")
    with Session() as s:
        got = dict(pm.hook.fetch_many(remote=sftp_remote, items=wanted, session=s))
    assert len(got) == len(wanted)
    assert got[missing] is False
    assert isinstance(got[trunc_oid], IntegrityError) and f"{trunc_n - 1} bytes, expected {trunc_n}" in str(got[trunc_oid])
    for oid, dest, n in wanted:
        if oid not in (missing, trunc_oid):
            assert got[oid] is True
            verify_file(dest, oid, n)


def test_batch_for_another_kind_is_not_answered(pm, tmp_path):
    other = Remote(name="d", kind="elsewhere", url=str(tmp_path), location=str(tmp_path))
    with Session() as s:
        assert pm.hook.stash_many(remote=other, items=[], session=s) is None
        assert pm.hook.fetch_many(remote=other, items=[], session=s) is None


def test_batch_failed_rename_is_never_success(pm, sftp_remote, sftp_store, tmp_path):
    """A fan-out directory that cannot be made (a file in its way): the rename fails, the batch
    fails as a whole, nothing of that object is left on the server."""
    items = batch_files(tmp_path, 40)
    oid = items[17][0]
    blocker = stored(sftp_store, oid).parent
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"in the way")
    with Session() as s, pytest.raises(RemoteError) as exc:
        list(pm.hook.stash_many(remote=sftp_remote, items=items, session=s))
    assert "jamtest" in one_line(exc) and oid in one_line(exc)
    assert leftovers(sftp_store) == []  # every temporary file was removed
    blocker.unlink()
    with Session() as s:  # the same session works again after a remote-wide error; so does a new one
        assert all(err is None for _, err in pm.hook.stash_many(remote=sftp_remote, items=items, session=s))
    for oid, _, n in items:
        verify_file(stored(sftp_store, oid), oid, n)


def test_batch_read_only_remote(pm, sshd, sftp_store, tmp_path):
    ro = read_only_server(sshd, sftp_store, tmp_path)
    try:
        remote = sftp_remote_for(f"sftp://{ro.alias}{sftp_store}")
        items = batch_files(tmp_path, 20)
        with Session() as s, pytest.raises(RemoteError, match="permission denied: cannot store"):
            list(pm.hook.stash_many(remote=remote, items=items, session=s))
        assert leftovers(sftp_store) == [] and list((sftp_store / "objects").iterdir()) == []
    finally:
        ro.kill()


def test_server_killed_mid_batch_upload(pm, sshd, sftp_remote, sftp_store, tmp_path):
    items = batch_files(tmp_path, 200, size=60_000)
    before = {p: p.read_bytes() for _, p, _ in items}
    killer = KillAfter(sshd, 2_000_000)  # some files are written, some in flight, some not sent
    with Session(progress=killer) as s, pytest.raises(RemoteError) as exc:
        list(pm.hook.stash_many(remote=sftp_remote, items=items, session=s))
    assert killer.fired and "lost during transfer" in one_line(exc)
    placed = [oid for oid, _, _ in items if stored(sftp_store, oid).exists()]
    for oid, _, n in items:
        if oid in placed:
            verify_file(stored(sftp_store, oid), oid, n)  # whatever is under its final name is whole
    assert len(placed) < len(items)
    assert {p: p.read_bytes() for _, p, _ in items} == before  # the local side is as it was
    sshd.start()
    with Session() as s:
        out = list(pm.hook.stash_many(remote=sftp_remote, items=items, session=s))
    assert len(out) == len(items) and all(err is None for _, err in out)
    for oid, _, n in items:
        verify_file(stored(sftp_store, oid), oid, n)


def test_server_killed_mid_batch_download(pm, sshd, sftp_remote, sftp_store, tmp_path):
    items = batch_files(tmp_path, 200, size=60_000)
    with Session() as s:
        assert all(err is None for _, err in pm.hook.stash_many(remote=sftp_remote, items=items, session=s))
    (tmp_path / "back").mkdir()
    wanted = [(oid, tmp_path / "back" / p.name, n) for oid, p, n in items]
    for _, dest, _ in wanted:
        dest.write_bytes(b"")
    killer = KillAfter(sshd, 2_000_000)
    with Session(progress=killer) as s, pytest.raises(RemoteError) as exc:
        list(pm.hook.fetch_many(remote=sftp_remote, items=wanted, session=s))
    assert killer.fired and "lost during transfer" in one_line(exc)
    sshd.start()
    for _, dest, _ in wanted:
        dest.write_bytes(b"")  # the core gives every attempt fresh empty files
    with Session() as s:
        got = dict(pm.hook.fetch_many(remote=sftp_remote, items=wanted, session=s))
    assert all(got[oid] is True for oid, _, _ in wanted)
    for oid, dest, n in wanted:
        verify_file(dest, oid, n)


def test_batch_with_verify_read_repairs_a_corrupt_object(pm, sftp_remote, sftp_store, tmp_path):
    """``verify = "read"`` takes the single-file path per object, which re-reads what it trusts."""
    items = batch_files(tmp_path, 12)
    remote = sftp_remote_for(sftp_remote.url, verify="read")
    with Session() as s:
        assert all(err is None for _, err in pm.hook.stash_many(remote=remote, items=items, session=s))
        oid, src, n = items[7]
        obj = stored(sftp_store, oid)
        obj.chmod(0o644)
        obj.write_bytes(b"\0" * n)  # same size, wrong bytes
        assert all(err is None for _, err in pm.hook.stash_many(remote=remote, items=items, session=s))
    for oid, _, n in items:
        verify_file(stored(sftp_store, oid), oid, n)

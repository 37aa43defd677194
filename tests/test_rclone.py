"""The rclone backend's own guards, each with the fault it stops injected on a real S3 server
(SeaweedFS through rclone): an upload whose source changes while it is sent commits nothing;
"absent" is never answered without the remote's marker; one rclone daemon per command, private,
stopped with the command and killed with jam; metadata names from anywhere are validated; the
socket directories of killed jams are swept and nothing else."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jam_core.errors import IntegrityError, RemoteError, UsageError
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import MARKER_NAME, hash_file, object_relpath
from tests.conftest import make_file

MiB = 1024 * 1024


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def _server_path(remote, rel: str) -> str:
    return f"{remote.location}/{rel}"


# -- URLs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,location", [
    ("rclone:seaweed:bucket/jam", "seaweed:bucket/jam"),
    ("rclone:seaweed:bucket/jam/", "seaweed:bucket/jam"),
    ("rclone:my-remote:", "my-remote:"),
    ("rclone::s3,provider=Minio,endpoint='http://127.0.0.1:9000':bucket/x",
     ":s3,provider=Minio,endpoint='http://127.0.0.1:9000':bucket/x"),
])
def test_parse_url(pm, url, location):
    assert pm.hook.parse_url(url=url) == {"kind": "rclone", "location": location}


@pytest.mark.parametrize("url,words", [
    ("rclone:", "name a remote"),
    ("rclone:/home/me/store", "a plain path is a `dir` remote"),
    ("rclone::local:/tmp/x", "`dir` remote"),
    ("rclone::memory:bucket", "forgets everything"),
    ("rclone:bad\nname:x", "control characters"),
    ("rclone::s3,provider=AWS,secret_access_key=SUPERSECRET:bucket", "holds a secret"),
    ("rclone::webdav,url=http://h,pass=SUPERSECRET:x", "holds a secret"),
    ("rclone::b2,account=a,key_file=SUPERSECRET:x", "holds a secret"),
    ("rclone::s3", "connection string"),
    ("rclone::sftp,host=h,skip_links=false:/x", "follow symlinks"),
    ("rclone::sftp,host=h,skip-links=false:/x", "follow symlinks"),
    ("rclone::sftp,host=h,global.copy_links:/x", "follow symlinks"),
    ("rclone::crypt,remote=\"sftp,host=h,links:/x\":y", "follow symlinks"),
])
def test_parse_url_refuses(pm, url, words):
    with pytest.raises(UsageError) as exc:
        pm.hook.parse_url(url=url)
    text = str(exc.value)
    assert words in text and "\n" not in text
    assert "SUPERSECRET" not in text  # never echoed


# -- uploads ----------------------------------------------------------------------------------------

def test_source_changed_while_sent_commits_nothing(pm, rclone_env, rclone_remote, tmp_path):
    """The file changes on disk while its bytes are sent (injected from the progress callback
    after the first chunk): the upload is cut before its end, so no object exists under the id,
    and stash raises IntegrityError."""
    src = tmp_path / "big"
    make_file(src, 24 * MiB, seed=3)
    oid, size = hash_file(src)
    changed = []

    def change(n):
        if not changed:
            changed.append(n)
            with open(src, "r+b") as f:  # the last MiB, not yet read
                f.seek(size - 100)
                f.write(b"X" * 100)

    with Session(progress=change) as s, pytest.raises(IntegrityError):
        pm.hook.stash(remote=rclone_remote, oid=oid, source=src, size=size, session=s)
    assert changed
    with Session() as s:
        assert pm.hook.has(remote=rclone_remote, oid=oid, size=size, session=s) is False
    r = rclone_env.rclone("lsf", "-R", _server_path(rclone_remote, "objects"), check=False)
    assert r.stdout.strip() == b"", f"an object was committed: {r.stdout!r}"


def test_existing_object_is_rewritten_not_trusted(pm, rclone_env, rclone_remote, tmp_path):
    """An object already under the id is stored again (its bytes are never taken on its size)."""
    src = tmp_path / "f"
    data = make_file(src, 200_000, seed=4)
    oid, size = hash_file(src)
    path = _server_path(rclone_remote, f"objects/{object_relpath(oid)}")
    rclone_env.rclone("rcat", path, input=b"\0" * size)  # garbage of the right size
    with Session() as s:
        assert pm.hook.stash(remote=rclone_remote, oid=oid, source=src, size=size, session=s) is True
    assert rclone_env.rclone("cat", path).stdout == data


# -- "absent" is never a guess ------------------------------------------------------------------------

def test_absent_needs_the_marker(pm, rclone_env, rclone_remote, tmp_path):
    """With the marker gone (a location emptied or swapped behind jam's back), a missing object is
    a RemoteError, not "absent": has, fetch, read_meta, remove and list_objects all refuse."""
    src = tmp_path / "f"
    make_file(src, 1000, seed=5)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.has(remote=rclone_remote, oid=oid, size=size, session=s) is False  # marker there
    rclone_env.rclone("deletefile", _server_path(rclone_remote, MARKER_NAME))
    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    with Session() as s:
        for call in (lambda: pm.hook.has(remote=rclone_remote, oid=oid, size=size, session=s),
                     lambda: pm.hook.fetch(remote=rclone_remote, oid=oid, dest=dest, size=size, session=s),
                     lambda: pm.hook.read_meta(remote=rclone_remote, name="refs/x", session=s),
                     lambda: pm.hook.remove(remote=rclone_remote, oid=oid, session=s),
                     lambda: list(pm.hook.list_objects(remote=rclone_remote, session=s, sweep=False))):
            with pytest.raises(RemoteError) as exc:
                call()
            assert "marker" in str(exc.value) and "'s3'" in str(exc.value)
        with pytest.raises(RemoteError):  # nothing is stored where jam's marker is not
            pm.hook.stash(remote=rclone_remote, oid=oid, source=src, size=size, session=s)
    assert rclone_env.rclone("lsf", "-R", _server_path(rclone_remote, "objects")).stdout.strip() == b""


# -- metadata, remove, free space ---------------------------------------------------------------------

def test_meta_remove_free_space(pm, rclone_env, rclone_remote, tmp_path):
    with Session() as s:
        assert pm.hook.read_meta(remote=rclone_remote, name="refs/abc", session=s) is False
        assert pm.hook.list_meta(remote=rclone_remote, prefix="refs/", session=s) == []
        assert pm.hook.write_meta(remote=rclone_remote, name="refs/abc", data=b"one", session=s) is True
        assert pm.hook.write_meta(remote=rclone_remote, name="refs/abc", data=b"two", session=s) is True
        assert pm.hook.write_meta(remote=rclone_remote, name="refs/def.json", data=b"", session=s) is True
        assert pm.hook.read_meta(remote=rclone_remote, name="refs/abc", session=s) == b"two"
        assert pm.hook.read_meta(remote=rclone_remote, name="refs/def.json", session=s) == b""
        assert pm.hook.list_meta(remote=rclone_remote, prefix="refs/", session=s) == ["refs/abc", "refs/def.json"]
        for hostile in ("../jam-remote.json", "refs/../../x", "/etc/passwd", "Refs/x", "refs//x", "", ".."):
            with pytest.raises(Exception) as exc:
                pm.hook.write_meta(remote=rclone_remote, name=hostile, data=b"x", session=s)
            assert "invalid metadata name" in str(exc.value)
        assert pm.hook.read_meta(remote=rclone_remote, name="refs/abc", session=s) == b"two"
        src = tmp_path / "f"
        make_file(src, 5000, seed=6)
        oid, size = hash_file(src)
        assert pm.hook.stash(remote=rclone_remote, oid=oid, source=src, size=size, session=s) is True
        assert pm.hook.remove(remote=rclone_remote, oid=oid, session=s) is True
        assert pm.hook.has(remote=rclone_remote, oid=oid, size=size, session=s) is False
        assert pm.hook.remove(remote=rclone_remote, oid=oid, session=s) is False
        assert pm.hook.free_space(remote=rclone_remote, session=s) is None  # S3 cannot tell
    assert rclone_env.rclone("cat", _server_path(rclone_remote, MARKER_NAME)).stdout  # the marker untouched


# -- the daemon -----------------------------------------------------------------------------------------

def _rclone_children() -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"rcd" in cmd:
            out.add(int(pid))
    return out


def test_one_private_daemon_per_command(pm, rclone_env, rclone_remote, tmp_path):
    """A whole batch goes through one rclone rcd, started on first use, on a unix socket in a
    0700 directory, its password nowhere in its command line; closing the session stops it."""
    items = []
    for i in range(30):
        src = tmp_path / f"f{i}"
        make_file(src, 4000 + i, seed=100 + i)
        oid, size = hash_file(src)
        items.append((oid, src, size))
    before = _rclone_children()
    with Session() as s:
        out = dict(pm.hook.stash_many(remote=rclone_remote, items=items, session=s))
        assert out == {oid: None for oid, _, _ in items}
        dests = [(oid, tmp_path / f"d{i}", size) for i, (oid, _, size) in enumerate(items)]
        for _, d, _ in dests:
            d.write_bytes(b"")
        got = dict(pm.hook.fetch_many(remote=rclone_remote, items=dests, session=s))
        assert got == {oid: True for oid, _, _ in items}
        mine = _rclone_children() - before
        assert len(mine) == 1, f"rclone processes started by this command: {mine}"
        (pid,) = mine
        daemon = s.cache[("jam_rclone", "daemon")]
        assert os.stat(daemon.dir).st_mode & 0o777 == 0o700
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert daemon._auth.split()[1].encode() not in cmdline and b"--rc-pass" not in cmdline
        assert b"--rc-no-auth" not in cmdline and b"unix://" in cmdline
    for (oid, src, _), (_, d, _) in zip(items, dests):
        assert d.read_bytes() == src.read_bytes()
    assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), "rclone outlived its command"
    assert not os.path.exists(daemon.dir)


def test_daemon_refuses_requests_without_its_password(rclone_env):
    """The daemon checks every request against an htpasswd file in its private directory (one
    SHA-1 per request, not the MD5-crypt of --rc-user/--rc-pass): no credentials or a wrong
    password get 401; the password is in neither the file, the command line nor the environment."""
    import base64
    import http.client

    from jam_rclone.daemon import Daemon, _UnixConnection

    d = Daemon()
    try:
        user, password = base64.b64decode(d._auth.split()[1]).decode().split(":", 1)
        st = os.stat(d.htpasswd)
        assert st.st_mode & 0o777 == 0o600 and os.stat(d.dir).st_mode & 0o777 == 0o700
        text = open(d.htpasswd).read()
        assert text.startswith(f"{user}:{{SHA}}") and password not in text
        for name in ("cmdline", "environ"):
            with open(f"/proc/{d.proc.pid}/{name}", "rb") as f:
                assert password.encode() not in f.read(), name
        wrong = "Basic " + base64.b64encode(f"{user}:{'0' * len(password)}".encode()).decode()
        for headers in ({}, {"Authorization": wrong}):
            conn = _UnixConnection(d.socket, 10)
            try:
                conn.request("POST", "/rc/noop", b"{}", {"Content-Type": "application/json", **headers})
                assert conn.getresponse().status == 401, headers
            finally:
                conn.close()
        assert d.call("rc/noop", {"x": 1}) == {"x": 1}
        conn = _UnixConnection(d.socket, 10)
        try:  # --rc-serve too: an object is never served to a stranger
            conn.request("GET", "/[seaweed:nothing]/x")
            assert conn.getresponse().status == 401
        finally:
            conn.close()
    finally:
        d.stop()
    assert not os.path.exists(d.dir)


def _requests(log: Path, under: str) -> dict[str, int]:
    """S3 requests rclone made on paths under ``under``, by method, from its --dump headers log."""
    import re
    from collections import Counter

    seen = Counter()
    # the request line alone: rclone logs each request's lines as separate messages, and parallel
    # transfers interleave them, so a request line need not follow its own "HTTP REQUEST" line
    for m in re.finditer(r"DEBUG : (GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/", log.read_text()):
        if m.group(2).split("?")[0].startswith(under):
            seen[m.group(1)] += 1
    return dict(seen)


def test_small_objects_cost_one_request_up_and_two_down(pm, rclone_env, rclone_remote, tmp_path, monkeypatch):
    """Counted on the wire (rclone's own --dump headers): storing a small object is one PUT (no
    HEAD after it: rclone checks the MD5 the server answers for it); fetching one is a HEAD and
    a GET. Every extra request per object is a round trip on every small file."""
    log = tmp_path / "rcd.log"
    monkeypatch.setenv("RCLONE_DUMP", "headers")
    monkeypatch.setenv("RCLONE_LOG_FILE", str(log))
    items = []
    for i in range(6):
        src = tmp_path / f"f{i}"
        make_file(src, 64 * 1024 + i, seed=300 + i)
        oid, size = hash_file(src)
        items.append((oid, src, size))
    bucket, _, prefix = rclone_remote.location.partition(":")[2].partition("/")
    objects = f"/{bucket}/{prefix}/objects/"
    with Session() as s:
        out = dict(pm.hook.stash_many(remote=rclone_remote, items=items, session=s))
        assert out == {oid: None for oid, _, _ in items}
    up = _requests(log, objects)  # read once the session ended: its rclone has exited, its log is whole
    assert up == {"PUT": 6}, up
    log2 = tmp_path / "rcd-down.log"
    monkeypatch.setenv("RCLONE_LOG_FILE", str(log2))  # the fetches' own rclone, its own log
    dests = [(oid, tmp_path / f"d{i}", size) for i, (oid, _, size) in enumerate(items)]
    for _, d, _ in dests:
        d.write_bytes(b"")
    with Session() as s:
        assert dict(pm.hook.fetch_many(remote=rclone_remote, items=dests, session=s)) == \
            {oid: True for oid, _, _ in items}
    down = _requests(log2, objects)
    # at most one HEAD per object (rclone may answer one from what it just learned) and one GET
    assert down.get("GET") == 6 and down.get("HEAD", 0) <= 6 and set(down) <= {"HEAD", "GET"}, down
    for (_, src, _), (_, d, _) in zip(items, dests):
        assert d.read_bytes() == src.read_bytes(), "differs"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False


_CHILD = r"""
import os, sys
from pathlib import Path
from jam_core.manager import make_plugin_manager
from jam_core.model import Remote, Session
pm = make_plugin_manager(load_entrypoints=False)
remote = Remote(name="s3", kind="rclone", url="rclone:" + sys.argv[1], location=sys.argv[1])
s = Session()
pm.hook.remote_id(remote=remote, session=s, create=False)
d = s.cache[("jam_rclone", "daemon")]
print(d.proc.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_rclone_dies_with_jam(rclone_env, rclone_remote):
    """jam killed by SIGKILL (no session close): its rclone dies with it (PR_SET_PDEATHSIG)."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, rclone_remote.location], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        pid = int(child.stdout.readline())
        fd = os.pidfd_open(pid)
    finally:
        child.kill()
        child.wait()
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(20_000), "rclone outlived the jam that started it"  # readable once it exits
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_socket_dirs_of_dead_jams_swept(tmp_path, monkeypatch):
    """Only jam-rclone-<dead pid>-XXXXXXXX directories holding nothing but rc.sock/rcd.log/htpasswd go."""
    from jam_rclone import daemon

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    gone = tmp_path / f"jam-rclone-{dead.pid}-abcd1234"
    gone.mkdir()
    (gone / "rc.sock").write_bytes(b"")
    (gone / "rcd.log").write_bytes(b"log")
    (gone / "htpasswd").write_bytes(b"u:{SHA}x\n")
    keep = {
        "alive": tmp_path / f"jam-rclone-{os.getppid()}-abcd1234",
        "user file inside": tmp_path / f"jam-rclone-{dead.pid}-zzzz9999",
        "not our name": tmp_path / f"jam-rclone-{dead.pid}-x",
    }
    for d in keep.values():
        d.mkdir()
        (d / "rc.sock").write_bytes(b"")
    (keep["user file inside"] / "notes.txt").write_text("mine")
    daemon._sweep_dirs()
    assert not gone.exists()
    for why, d in keep.items():
        assert d.exists(), why


# -- large objects: fetched by rclone's own copy into the file jam holds ---------------------------------

def test_large_fetch_reports_progress_and_stops_when_cancelled(pm, rclone_env, rclone_remote, tmp_path, monkeypatch):
    import jam_rclone.store

    monkeypatch.setattr(jam_rclone.store, "LARGE", 1 << 20)
    src = tmp_path / "big"
    data = make_file(src, 12 * MiB + 3, seed=8)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=rclone_remote, oid=oid, source=src, size=size, session=s) is True
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        with Session() as s:
            assert pm.hook.fetch(remote=rclone_remote, oid=oid, dest=Path(f"/proc/self/fd/{fd}"), size=size,
                                 session=s) is True
            assert s.moved == size
        assert os.fstat(fd).st_size == size and os.pread(fd, size + 1, 0) == data
    finally:
        os.close(fd)

    class Cancelled(Exception):
        pass

    def cancel(n):
        raise Cancelled()

    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    with Session(progress=cancel) as s, pytest.raises(Cancelled):
        pm.hook.fetch(remote=rclone_remote, oid=oid, dest=dest, size=size, session=s)
    with Session() as s:  # another size: nothing is written
        from jam_core.errors import IntegrityError as IE

        with pytest.raises(IE):
            pm.hook.fetch(remote=rclone_remote, oid=oid, dest=dest, size=size + 1, session=s)


def test_local_rclone_remote_refused(pm, rclone_env, monkeypatch, tmp_path):
    """An rclone remote of type local (here through the environment, as a config would) is a
    directory on this machine: refused, so it cannot slip past the root/remote overlap checks."""
    from jam_core.model import Remote

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("RCLONE_CONFIG_MYDISK_TYPE", "local")
    remote = Remote(name="disk", kind="rclone", url=f"rclone:mydisk:{store}", location=f"mydisk:{store}")
    with Session() as s, pytest.raises(UsageError) as exc:
        pm.hook.check_remote(remote=remote, session=s, create=True)
    assert "`dir` remote" in str(exc.value)
    assert list(store.iterdir()) == []


# -- symlinks and special files on a file system behind rclone (its sftp, a real sshd) ---------------
#
# rclone's sftp follows a symlink on stat, read and delete, and a read of a FIFO hangs the server:
# jam counts an item only as its directory's listing shows it (the daemon sets skip_links).

@pytest.fixture
def sftp_rclone(pm, sshd, tmp_path, monkeypatch):
    """An rclone remote of type sftp on the real sshd (as the conformance kit's sftp class): its
    store on the server's disk, where the tests put symlinks and FIFOs behind jam's back."""
    from jam_core.model import Remote

    store = tmp_path / "server" / "store"
    store.mkdir(parents=True)
    home = Path(os.environ["HOME"])
    for k, v in {"TYPE": "sftp", "HOST": "127.0.0.1", "PORT": str(sshd.port), "USER": sshd.user,
                 "KEY_FILE": str(sshd.client_key), "KNOWN_HOSTS_FILE": str(home / ".ssh" / "known_hosts")}.items():
        monkeypatch.setenv(f"RCLONE_CONFIG_SSHTEST_{k}", v)
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "no-rclone.conf"))
    remote = Remote(name="far", kind="rclone", url=f"rclone:sshtest:{store}", location=f"sshtest:{store}")
    with Session() as s:
        pm.hook.check_remote(remote=remote, session=s, create=True)
        pm.hook.remote_id(remote=remote, session=s, create=True)
    return remote, store


def _object(tmp_path, name: str, n: int, seed: int):
    src = tmp_path / name
    make_file(src, n, seed=seed)
    oid, size = hash_file(src)
    return src, oid, size


def _listed(pm, remote) -> set[str]:
    with Session() as s:
        return {oid for oid, _ in pm.hook.list_objects(remote=remote, session=s, sweep=False)}


def _nothing_through(pm, remote, oid: str, size: int, tmp_path) -> None:
    """Not held, not fetched (nothing written), not removed, not listed."""
    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    with Session() as s:
        assert pm.hook.has(remote=remote, oid=oid, size=size, session=s) is False
        assert pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=s) is False
        assert pm.hook.remove(remote=remote, oid=oid, session=s) is False
    assert _listed(pm, remote) == set()
    assert dest.read_bytes() == b""


def test_symlink_in_an_objects_place_is_not_held(pm, sftp_rclone, tmp_path):
    """A symlink at an object's path, to a file outside the store holding exactly that object's
    bytes (so even a hash check would pass): not held, not listed, not fetched (nothing read
    through it), not removed (the link and its target stay)."""
    remote, store = sftp_rclone
    src, oid, size = _object(tmp_path, "f", 5000, seed=21)
    mine, mine_oid, mine_size = _object(tmp_path, "g", 3000, seed=22)
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=mine_oid, source=mine, size=mine_size, session=s) is True
    outside = tmp_path / "server" / "outside"
    outside.mkdir()
    (outside / "copy").write_bytes(src.read_bytes())
    link = store / "objects" / object_relpath(oid)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / "copy")
    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    with Session() as s:
        assert pm.hook.has(remote=remote, oid=oid, size=size, session=s) is False, "has() followed a symlink"
        assert pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=s) is False
        assert pm.hook.hash_object(remote=remote, oid=oid, size=size, session=s) is False
        assert pm.hook.remove(remote=remote, oid=oid, session=s) is False
        assert pm.hook.has(remote=remote, oid=mine_oid, size=mine_size, session=s) is True
    assert _listed(pm, remote) == {mine_oid}
    assert dest.read_bytes() == b"", "fetch read through a symlink"
    assert link.is_symlink() and (outside / "copy").read_bytes() == src.read_bytes()


def test_fifo_in_an_objects_place_is_never_opened(pm, sftp_rclone, tmp_path, monkeypatch):
    """A FIFO at an object's path (size 0 to a stat): not held, and a fetch answers "not here"
    at once instead of opening it (which hangs the server's sftp session: the daemon's I/O
    timeout is cut to 20 s here, so a regression fails instead of hanging the suite)."""
    import jam_rclone.daemon

    monkeypatch.setattr(jam_rclone.daemon.Daemon.__init__, "__defaults__", (None, 20.0))
    remote, store = sftp_rclone
    empty, oid, size = _object(tmp_path, "empty", 0, seed=23)
    fifo = store / "objects" / object_relpath(oid)
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    _nothing_through(pm, remote, oid, size, tmp_path)
    assert fifo.exists() and not fifo.is_file()


def test_symlinked_fan_out_directory_is_not_followed(pm, sftp_rclone, tmp_path):
    """``objects/b3/<xx>`` a symlink to a directory outside the store holding the object under
    its name: nothing held, listed, fetched or removed through it; a store into it is refused
    (RemoteError) and writes nothing there."""
    remote, store = sftp_rclone
    src, oid, size = _object(tmp_path, "f", 4000, seed=24)
    rel = Path(object_relpath(oid))
    outside = tmp_path / "server" / "elsewhere"
    outside.mkdir()
    (outside / rel.name).write_bytes(src.read_bytes())
    fan = store / "objects" / rel.parent
    fan.parent.mkdir(parents=True, exist_ok=True)
    fan.symlink_to(outside)
    _nothing_through(pm, remote, oid, size, tmp_path)
    assert (outside / rel.name).read_bytes() == src.read_bytes(), "removed through a symlinked directory"
    (outside / rel.name).unlink()
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    assert "symlink" in str(exc.value) and "\n" not in str(exc.value)
    assert list(outside.iterdir()) == [], "stored through a symlinked directory"


def test_symlinked_tmp_is_neither_swept_nor_written(pm, sftp_rclone, tmp_path):
    """``tmp/`` replaced by a symlink to another directory holding a stale part: the sweep
    removes nothing there, a store writes nothing there (refused), and list_objects does not
    list it."""
    from jam_core import part_name

    remote, store = sftp_rclone
    src, oid, size = _object(tmp_path, "f", 2000, seed=25)
    other = tmp_path / "server" / "other-tmp"
    other.mkdir()
    stale = other / part_name()
    stale.write_bytes(b"someone's part")
    os.utime(stale, (1, 1))  # ancient: a stale part if it were jam's
    os.rmdir(store / "tmp")
    (store / "tmp").symlink_to(other)
    with Session() as s, pytest.raises(RemoteError):
        pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)
    with Session() as s:
        listed = [name for name, _ in pm.hook.list_objects(remote=remote, session=s, sweep=True)]
    assert listed == []
    assert sorted(p.name for p in other.iterdir()) == [stale.name], "removed or wrote through a symlinked tmp/"


def test_users_rclone_settings_cannot_turn_links_on(pm, sftp_rclone, tmp_path, monkeypatch):
    """The user's rclone settings (an RCLONE_CONFIG_<REMOTE>_SKIP_LINKS=false, a backend-wide
    RCLONE_SFTP_SKIP_LINKS=false) do not make jam's daemon list a symlink or a FIFO as a file:
    its flags win."""
    remote, store = sftp_rclone
    monkeypatch.setenv("RCLONE_CONFIG_SSHTEST_SKIP_LINKS", "false")
    monkeypatch.setenv("RCLONE_SFTP_SKIP_LINKS", "false")
    with Session() as s:
        assert pm.hook.write_meta(remote=remote, name="refs/mine", data=b"mine\n", session=s) is True
    secret = tmp_path / "server" / "secret"
    secret.write_bytes(b"secret")
    (store / "meta" / "refs" / "link").symlink_to(secret)
    os.mkfifo(store / "meta" / "refs" / "fifo")
    with Session() as s:
        assert pm.hook.list_meta(remote=remote, prefix="refs", session=s) == ["refs/mine"]
        with pytest.raises(RemoteError):
            pm.hook.read_meta(remote=remote, name="refs/link", session=s)


def test_symlinked_marker_is_not_an_identity(pm, sftp_rclone, tmp_path):
    """The identity marker replaced by a symlink to another remote's marker: the remote is not
    taken for that one (an error, never its id), and "absent" is never answered through it."""
    remote, store = sftp_rclone
    other = tmp_path / "server" / "other.json"
    os.replace(store / MARKER_NAME, other)
    (store / MARKER_NAME).symlink_to(other)
    _, oid, size = _object(tmp_path, "f", 100, seed=26)
    with Session() as s:
        with pytest.raises(RemoteError):
            pm.hook.remote_id(remote=remote, session=s, create=False)
        with pytest.raises(RemoteError):
            pm.hook.has(remote=remote, oid=oid, size=size, session=s)


def test_links_not_followed_through_a_wrapper_of_a_local_disk(pm, tmp_path, monkeypatch):
    """An rclone wrapper (chunker) over a directory of this machine is not refused as ``local``
    (rclone does not pass IsLocal through wrappers); its symlinks and FIFOs are still never
    listed or read, even with the user's rclone settings asking to follow links (copy_links).
    (The daemon's I/O timeout is cut to 20 s: a read that opens the FIFO fails, not hangs.)"""
    import jam_rclone.daemon
    from jam_core.model import Remote

    monkeypatch.setattr(jam_rclone.daemon.Daemon.__init__, "__defaults__", (None, 20.0))

    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (outside / "x").write_bytes(b"secret")
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "no-rclone.conf"))
    monkeypatch.setenv("RCLONE_CONFIG_CHK_TYPE", "chunker")
    monkeypatch.setenv("RCLONE_CONFIG_CHK_REMOTE", str(store))
    monkeypatch.setenv("RCLONE_COPY_LINKS", "true")
    monkeypatch.setenv("RCLONE_LOCAL_COPY_LINKS", "true")
    remote = Remote(name="chk", kind="rclone", url="rclone:chk:", location="chk:")
    with Session() as s:
        pm.hook.check_remote(remote=remote, session=s, create=True)
        pm.hook.remote_id(remote=remote, session=s, create=True)
        assert pm.hook.write_meta(remote=remote, name="refs/mine", data=b"mine\n", session=s) is True
    (store / "meta" / "refs" / "link").symlink_to(outside / "x")
    os.mkfifo(store / "meta" / "refs" / "fifo")
    (store / "meta" / "linked").symlink_to(outside)
    with Session() as s:
        assert pm.hook.list_meta(remote=remote, prefix="refs", session=s) == ["refs/mine"]
        for name in ("refs/link", "refs/fifo", "linked/x"):
            with pytest.raises(RemoteError):
                pm.hook.read_meta(remote=remote, name=name, session=s)
        with pytest.raises(RemoteError):
            pm.hook.list_meta(remote=remote, prefix="linked", session=s)

"""Many small objects over SFTP, continued (issue 13): what each one still costs.

- paramiko is imported without ``invoke`` (which paramiko.config imports at once, with
  unittest.mock and asyncio, only to run ssh_config ``Match exec`` lines): ~80 ms of CPU on
  every command that talks to a server; a ``Match exec`` line still works (invoke is imported
  when one runs).
- A batch fsyncs each directory it renamed into through a handle its connection keeps open
  (one request per directory instead of open + fsync + close); a directory the run had to make
  again (it went away) is opened afresh, never fsynced through a handle of the one that is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Remote, Session

    url = {url!r}
    pm = make_plugin_manager(load_entrypoints=False)
    remote = Remote(name="far", kind="sftp", url=url, location=url, options={{}})
    with Session() as s:
        print(pm.hook.check_remote(remote=remote, session=s, create=False))
    print("paramiko" in sys.modules, "invoke" in sys.modules)
    """
)


def run_check(url: str) -> list[str]:
    res = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(REPO), url=url)],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_talking_to_a_server_does_not_import_invoke(sftp_remote, sftp_store):
    """A real connection (check_remote: login, stat, a probe written) in a fresh interpreter:
    paramiko is in, invoke is not. Mutation-checked against ``_import_paramiko``'s
    ``sys.modules["invoke"] = None``."""
    out = run_check(f"sftp://jamtest{sftp_store}")
    assert out[0].startswith("sftp "), out
    assert out[1] == "True False", "invoke was imported with paramiko"


def test_match_exec_in_ssh_config_still_runs(sshd, sftp_remote, sftp_store):
    """The host is reached only through a ``Match exec`` block (HostName, Port, User, key):
    the command runs (invoke imported then) and the connection works; a ``Match exec`` that
    fails does not apply. Mutation-checked against the ``_Invoke`` stand-in (without it paramiko
    raises its "invoke is not installed" error for the line)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("invoke") is None:
        pytest.skip("invoke is not installed (paramiko cannot run Match exec without it either)")
    config = Path(os.environ["HOME"]) / ".ssh" / "config"
    key = Path(os.environ["HOME"]) / ".ssh" / "id_ed25519"
    config.write_text(config.read_text() + textwrap.dedent(
        f"""
        Match host viaexec exec "false"
            Port 1
        Match host viaexec exec "test -d /"
            HostName 127.0.0.1
            Port {sshd.port}
            User {sshd.user}
            IdentityFile {key}
            IdentitiesOnly yes
        """))
    out = run_check(f"sftp://viaexec{sftp_store}")
    assert out[0].startswith("sftp "), out
    assert out[1] == "True True", "the Match exec line did not run through invoke"


# -- directories fsynced through the handles a connection keeps open ------------------------------

import pytest  # noqa: E402
from paramiko.sftp import (  # noqa: E402
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_STATUS,
    SFTP_FAILURE,
    SFTP_OK,
)

from jam_core.manager import make_plugin_manager  # noqa: E402
from jam_core.model import Session  # noqa: E402
from jam_core.objects import hash_file, object_relpath, verify_file  # noqa: E402
from tests.conftest import make_file  # noqa: E402
from tests.conftest_sshd import sftp_remote_for  # noqa: E402
from tests.safety_support import held_fds  # noqa: E402
from tests.test_sftp_safety import Recorder, stash_many, stored  # noqa: E402


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


@pytest.fixture
def one_conn(sshd, sftp_store):
    """A remote whose pool has one connection: every batch meets the same connection."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    return sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", connections=1)


def pairs_in_same_dirs(tmp_path: Path, n: int) -> tuple[list[Path], list[Path]]:
    """Two lists of ``n`` files: the i-th of each lands in the same fan-out directory."""
    by_dir: dict[str, list[Path]] = {}
    seed = 0
    while True:
        p = tmp_path / "src" / f"c{seed}"
        make_file(p, 3000 + seed, seed=seed)
        seed += 1
        by_dir.setdefault(object_relpath(hash_file(p)[0]).rsplit("/", 1)[0], []).append(p)
        full = [v for v in by_dir.values() if len(v) >= 2]
        if len(full) >= n:
            return [v[0] for v in full[:n]], [v[1] for v in full[:n]]


def dir_of(store: Path, oid: str) -> str:
    return str(stored(store, oid).parent)


def assert_durable_kept(rec: Recorder, final: str) -> None:
    """A posix-rename onto ``final`` answered OK on a connection, then that connection fsynced
    (OK) a handle of ``final``'s directory (or of ``final``) it had opened, at any time, and
    not closed before that fsync."""
    for e in rec.events:
        if e[0] == "req" and e[3] == CMD_EXTENDED and e[4][0] == "posix-rename@openssh.com" and e[4][2] == final:
            ri, rep = rec._reply_of(e[1], e[2])
            if rep[3] == CMD_STATUS and rep[4] == SFTP_OK:
                conn = e[1]
                break
    else:
        raise AssertionError(f"{final} was never renamed into place")
    opened: dict[bytes, str] = {}  # handle -> path, on conn, while open
    asked: dict[int, str] = {}
    for i, e in enumerate(rec.events):
        if e[1] != conn:
            continue
        if e[0] == "req" and e[3] == CMD_OPEN:
            asked[e[2]] = e[4][0]
        elif e[0] == "rep" and e[3] == CMD_HANDLE and e[2] in asked:
            opened[e[4]] = asked.pop(e[2])
        elif e[0] == "req" and e[3] == CMD_CLOSE:
            opened.pop(e[4][0], None)
        elif (i > ri and e[0] == "req" and e[3] == CMD_EXTENDED and e[4][0] == "fsync@openssh.com"
              and opened.get(e[4][1]) in (final, final.rsplit("/", 1)[0])):
            _, srep = rec._reply_of(conn, e[2])
            if srep[3] == CMD_STATUS and srep[4] == SFTP_OK:
                return
    raise AssertionError(f"{final} was not fsynced after its rename")


def dir_opens(rec: Recorder, store: Path) -> list[str]:
    return [e[4][0] for e in rec.events if e[0] == "req" and e[3] == CMD_OPEN
            and str(e[4][0]).startswith(str(store / "objects")) and Path(e[4][0]).is_dir()]


def test_a_second_batch_fsyncs_its_directories_without_opening_them(pm, one_conn, sftp_store, tmp_path, monkeypatch):
    """Two batches in one command, each object of the second in a directory the first renamed
    into: the second opens no directory (one fsync request each, through the kept handle) and
    every object of both is durable. Mutation-checked against ``keep_dirs=True`` in
    parallel._spread (and the reuse branch of Uploads._sync_dir)."""
    first, second = pairs_in_same_dirs(tmp_path, 6)
    with Session() as s:
        rec = Recorder(monkeypatch)
        items1, out = stash_many(pm, one_conn, first, s)
        assert all(err is None for err in out.values()), out
        mark = len(rec.events)
        items2, out = stash_many(pm, one_conn, second, s)
        assert all(err is None for err in out.values()), out
    for oid, _, size in items1 + items2:
        assert_durable_kept(rec, str(stored(sftp_store, oid)))
        verify_file(stored(sftp_store, oid), oid, size)
    later = Recorder.__new__(Recorder)
    later.events = rec.events[mark:]
    assert dir_opens(later, sftp_store) == [], "a directory kept open was opened again"
    synced = [e for e in later.events if e[0] == "req" and e[3] == CMD_EXTENDED and e[4][0] == "fsync@openssh.com"]
    assert len(synced) == 6 + 6, "one fsync per object and one per directory"


def test_a_directory_made_again_is_never_fsynced_through_the_old_handle(
        pm, one_conn, sftp_store, tmp_path, monkeypatch):
    """Between two batches the fan-out directory is removed on the server (with its object):
    the second batch's rename fails, the directory is made again, and its fsync goes through a
    handle opened after the rename (the kept one is of the directory that is gone: an fsync
    there makes nothing durable). Mutation-checked against ``remade_dirs.update`` in
    Uploads._renamed."""
    import shutil

    (a,), (b,) = pairs_in_same_dirs(tmp_path, 1)
    with Session() as s:
        items1, out = stash_many(pm, one_conn, [a], s)
        assert all(err is None for err in out.values()), out
        gone = stored(sftp_store, items1[0][0]).parent
        shutil.rmtree(gone)  # the directory the connection holds a handle of
        rec = Recorder(monkeypatch)
        items2, out = stash_many(pm, one_conn, [b], s)
        assert all(err is None for err in out.values()), out
    final = str(stored(sftp_store, items2[0][0]))
    rec.assert_durable(final)  # an open after the rename, then its fsync
    verify_file(Path(final), items2[0][0], items2[0][2])


def server_dir_fds(sshd, store: Path) -> int:
    """Descriptors of directories under ``store/objects`` the server's processes hold open."""
    from tests.sshd import _descendants

    n = 0
    for pid in _descendants(sshd.proc.pid):
        for target in held_fds(pid):
            if target.startswith(str(store / "objects")) and os.path.isdir(target):
                n += 1
    return n


def test_kept_handles_are_bounded_and_closed_least_recent_first(
        pm, sshd, one_conn, sftp_store, tmp_path, monkeypatch):
    """At most DIR_HANDLES directories stay open on the server (its descriptors, read from
    /proc); the objects of a batch that overflows them are still durable. Mutation-checked
    against the eviction loop in Uploads._dir_opened."""
    from jam_sftp import batch

    monkeypatch.setattr(batch, "DIR_HANDLES", 3)
    paths = [tmp_path / "src" / f"s{i}" for i in range(12)]
    for i, p in enumerate(paths):
        make_file(p, 2000 + i, seed=i)
    rec = Recorder(monkeypatch)
    with Session() as s:
        items, out = stash_many(pm, one_conn, paths, s)
        assert all(err is None for err in out.values()), out
        assert server_dir_fds(sshd, sftp_store) <= 3
    for oid, _, _ in items:
        assert_durable_kept(rec, str(stored(sftp_store, oid)))


def test_a_kept_handle_whose_fsync_fails_is_dropped_and_the_objects_synced_one_by_one(
        pm, one_conn, sftp_store, tmp_path, monkeypatch):
    """The server refuses the fsync through a kept directory handle: the objects waiting for
    it are fsynced by their final names (never counted on the failed fsync) and the handle is
    closed, not used again. Mutation-checked against the drop in Uploads._dir_synced."""
    from jam_sftp.pipeline import Pipeline
    from jam_sftp.transfer import SftpStatus

    first, second = pairs_in_same_dirs(tmp_path, 2)
    held: list = []
    with Session() as s:
        items1, out = stash_many(pm, one_conn, first, s)
        assert all(err is None for err in out.values()), out
        send = Pipeline.send

        def refusing(self, f, on_reply, t, *args):
            held[:] = [self.ops.conn]
            if t == CMD_EXTENDED and args[0] == "fsync@openssh.com" and args[1] in self.ops.conn.dir_handles.values():
                def refused(rt, msg, path=f.final):
                    raise SftpStatus(SFTP_FAILURE, "refused", path)

                return send(self, f, refused, t, *args)
            return send(self, f, on_reply, t, *args)

        monkeypatch.setattr(Pipeline, "send", refusing)
        rec = Recorder(monkeypatch)
        items2, out = stash_many(pm, one_conn, second, s)
        assert all(err is None for err in out.values()), out
        for oid, _, size in items2:
            d = dir_of(sftp_store, oid)
            assert d not in held[0].dir_handles, "a handle whose fsync failed is kept"
            final = str(stored(sftp_store, oid))
            rec.assert_durable(final)
            verify_file(Path(final), oid, size)


# -- a batch sharded by fan-out directory over the connections ------------------------------------


def test_feed_shards_each_pipeline_takes_its_own_then_helps_with_the_rest():
    """Each claimed shard is taken first (in order); an empty shard's pipeline takes from the
    fullest other one; a claim prefers the shard asked for; a large object that does not fit
    is waited for, not skipped. Mutation-checked against the own-queue-first rule of
    Feed.take and against ``prefer`` in Feed.claim."""
    from jam_sftp.pipeline import Feed, _File

    files = [_File(f"o{i}", Path(f"p{i}"), i) for i in range(10)]
    feed = Feed(files, 2, lambda f: int(f.oid[1:]) % 2)
    assert feed.claim(1) == 1 and feed.claim(1) == 0 and feed.claim(0) == -1
    yes = lambda f: True  # noqa: E731
    assert [feed.take(yes, 1).oid for _ in range(5)] == ["o1", "o3", "o5", "o7", "o9"]
    assert feed.take(yes, 1).oid == "o0", "an empty shard's pipeline helps with the others"
    assert feed.take(lambda f: f.oid != "o2", 0) is None, "an object that does not fit yet is waited for"
    assert [feed.take(yes, 0).oid for _ in range(4)] == ["o2", "o4", "o6", "o8"]
    assert feed.take(yes, 0) is None and feed.take(yes, -1) is None


def test_connections_keep_their_shard_from_batch_to_batch(pm, sshd, sftp_store, tmp_path, monkeypatch):
    """Two batches spread over the pool's two connections: each connection takes the shard it
    had (so it fsyncs the same directories, through the handles it kept). Mutation-checked
    against the ``last if shards == want`` preference in parallel._spread."""
    from jam_sftp import get_pool, parallel

    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", connections=2)
    monkeypatch.setattr(parallel, "SPREAD_SYNCED", 4)
    claims: list[tuple[int, int]] = []
    orig = parallel.Feed.claim

    def claim(self, prefer=-1):
        got = orig(self, prefer)
        claims.append((prefer, got))
        return got

    monkeypatch.setattr(parallel.Feed, "claim", claim)
    paths = [tmp_path / "src" / f"s{i}" for i in range(24)]
    for i, p in enumerate(paths):
        make_file(p, 2000 + i, seed=i)
    with Session() as s:
        for half in (paths[:12], paths[12:]):
            _, out = stash_many(pm, remote, half, s)
            assert all(err is None for err in out.values()), out
            shards = sorted(c.shard for c in get_pool(remote, s)._idle)
            assert shards == [(2, 0), (2, 1)], shards
    assert len(claims) == 4 and all(prefer == got for prefer, got in claims[2:]), claims


# -- requests packed by hand, as paramiko packs them ------------------------------------------------


def test_requests_are_packed_as_paramiko_packs_them():
    """Pipeline.send packs SFTP requests itself (a write's data is not copied through a
    Message): every kind of argument gives the bytes paramiko's ``_async_request`` would send,
    a name outside ASCII included (UTF-8). Mutation-checked against the UTF-8 encoding and
    the uint64 packing in Pipeline.send."""
    import struct
    import threading
    from types import SimpleNamespace

    import paramiko
    from paramiko.sftp import CMD_OPEN, CMD_WRITE, int64
    from paramiko.sftp_attr import SFTPAttributes

    from jam_sftp.pipeline import Pipeline, _File

    attrs = SFTPAttributes()
    attrs.st_mode = 0o444
    cases = [(CMD_OPEN, ("/srv/b3/ab/é-ø.part", 0x1A, attrs)),
             (CMD_WRITE, (b"\x00\x00\x00\x07", int64(5 << 32 | 9), os.urandom(70_000))),
             (CMD_EXTENDED, ("posix-rename@openssh.com", "/a/ü", "/b/ü"))]
    sftp = SimpleNamespace(_lock=threading.Lock(), request_number=41, _expecting={})
    p = Pipeline.__new__(Pipeline)
    p.sftp, p.out, p.out_bytes, p.callbacks = sftp, [], 0, {}
    expected = b""
    for t, args in cases:
        msg = paramiko.Message()
        msg.add_int(sftp.request_number)
        for item in args:
            if isinstance(item, int64):
                msg.add_int64(item)
            elif isinstance(item, int):
                msg.add_int(item)
            elif isinstance(item, SFTPAttributes):
                item._pack(msg)
            else:
                msg.add_string(item)
        body = msg.asbytes()
        expected += struct.pack(">IB", len(body) + 1, t) + body
        p.send(_File("", Path(), 0), lambda t, m: None, t, *args)
    got = b"".join(p.out)
    assert got == expected, "packed differently"
    assert p.out_bytes == len(expected) and sorted(sftp._expecting) == [41, 42, 43]


def test_kept_handles_leave_room_for_the_servers_descriptor_limit(pm, sshd, one_conn, sftp_store, tmp_path):
    """The server may open only 140 descriptors (its RLIMIT_NOFILE, lowered with prlimit; it
    says so in ``limits@openssh.com``): a batch over more directories than that still stores
    every object, keeping at most what leaves room for a full window of objects. Mutation-
    checked against the cap in Uploads._dir_opened (the handles then exhaust the server's
    descriptors and objects fail)."""
    import shutil
    import subprocess

    from jam_sftp.batch import HANDLES_SPARE, WINDOW

    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    subprocess.run([prlimit, "--pid", str(sshd.proc.pid), "--nofile=140:140"], check=True)
    paths = [tmp_path / "src" / f"s{i}" for i in range(260)]
    for i, p in enumerate(paths):
        make_file(p, 1000 + i, seed=i)
    with Session() as s:
        items, out = stash_many(pm, one_conn, paths, s)
        assert all(err is None for err in out.values()), [e for e in out.values() if e][:3]
        assert server_dir_fds(sshd, sftp_store) <= 135 - WINDOW - HANDLES_SPARE
    for oid, _, size in items:
        verify_file(stored(sftp_store, oid), oid, size)

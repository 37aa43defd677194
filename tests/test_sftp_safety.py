"""The sftp backend's safety guarantees (issue 8, brief H2), each injected on a real OpenSSH
server (tests/sshd.py): an existing object is never trusted by its size, renames are fsynced
before success, a cut connection is named as such by the real `jam` command, stale uploads are
swept, a full disk fails one object, fetches are bounded and sparse, the identity marker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paramiko.sftp import CMD_EXTENDED, CMD_HANDLE, CMD_OPEN, CMD_STATUS, SFTP_OK

from jam_core.errors import IntegrityError, JamError, RemoteError
from jam_core.fs import part_name
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import MARKER_NAME, hash_file, object_relpath, parse_marker, verify_file
from jam_core.stub import XATTR, StubRecord
from tests.conftest import REPO, make_file
from tests.conftest_sshd import sftp_remote_for
from tests.test_sftp_cli import jam, sftp_root


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def stored(store: Path, oid: str) -> Path:
    return store / "objects" / object_relpath(oid)


def stash_many(pm, remote, paths, session):
    items = []
    for p in paths:
        oid, size = hash_file(p)
        items.append((oid, p, size))
    return items, dict(pm.hook.stash_many(remote=remote, items=items, session=session))


def flip(path: Path, at: int = 100) -> None:
    """Damage a stored object in place: same size, some bytes flipped."""
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(16)
        f.seek(at)
        f.write(bytes(x ^ 0xFF for x in b))
    path.chmod(0o444)


# -- 1. an existing object counts only once its content is verified ------------------------------


@pytest.mark.parametrize("size", [70_000, 5 * 1024 * 1024 + 3], ids=["pipelined", "single"])
def test_corrupt_existing_object_is_rewritten_not_trusted(runner, tmp_path, sshd, sftp_store, monkeypatch, size):
    """A stashed, B has A's content; A's object is damaged on the server (same size). Stashing B
    must leave a good object, so both stubs check out right. Mutation-checked against the old
    "already there with its size: skip" shortcut in batch.Uploads._opened (which Ops.put runs too)."""
    tree = sftp_root(runner, tmp_path, sshd, sftp_store, monkeypatch)
    data = make_file(tree / "a.bin", size, seed=5)
    jam(runner, "stash", "a.bin")
    oid = StubRecord.unpack(os.getxattr(tree / "a.bin", XATTR)).oid
    flip(stored(sftp_store, oid))
    with pytest.raises(IntegrityError):
        verify_file(stored(sftp_store, oid), oid, size)
    (tree / "b.bin").write_bytes(data)
    jam(runner, "stash", "b.bin")
    verify_file(stored(sftp_store, oid), oid, size)  # the good copy is on the server again
    assert list((sftp_store / "tmp").iterdir()) == []
    jam(runner, "checkout", "a.bin", "b.bin")
    assert (tree / "a.bin").read_bytes() == data and (tree / "b.bin").read_bytes() == data


def test_corrupt_existing_object_through_the_stash_hook(pm, sftp_remote, sftp_store, tmp_path):
    make_file(tmp_path / "a", 100_000, seed=3)
    oid, size = hash_file(tmp_path / "a")
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "a", size=size, session=s)
    flip(stored(sftp_store, oid))
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "a", size=size, session=s)
    verify_file(stored(sftp_store, oid), oid, size)


# -- 2. the rename is made durable before success -------------------------------------------------


class Recorder:
    """Every SFTP request the backend sends and every reply it gets, in order, per connection."""

    def __init__(self, monkeypatch):
        from jam_sftp.batch import Pipeline
        from jam_sftp.transfer import Replies

        self.events: list[tuple] = []
        rsend, rresp, psend = Replies.send, Replies._async_response, Pipeline.send
        rec = self

        def replies_send(r, t, *args):
            num = rsend(r, t, *args)
            rec.events.append(("req", id(r.sftp), num, t, args))
            return num

        def replies_resp(r, t, msg, num):
            rec.reply(r.sftp, num, t, msg)
            rresp(r, t, msg, num)

        def pipeline_send(p, f, on_reply, t, *args):
            num, sftp = p.sftp.request_number, p.sftp

            def wrapped(rt, msg):
                rec.reply(sftp, num, rt, msg)
                return on_reply(rt, msg)

            psend(p, f, wrapped, t, *args)
            rec.events.append(("req", id(sftp), num, t, args))

        monkeypatch.setattr(Replies, "send", replies_send)
        monkeypatch.setattr(Replies, "_async_response", replies_resp)
        monkeypatch.setattr(Pipeline, "send", pipeline_send)

    def reply(self, sftp, num, t, msg) -> None:
        pos = msg.packet.tell()
        value = msg.get_binary() if t == CMD_HANDLE else msg.get_int() if t == CMD_STATUS else None
        msg.packet.seek(pos)
        self.events.append(("rep", id(sftp), num, t, value))

    def _reply_of(self, conn, num):
        for i, e in enumerate(self.events):
            if e[0] == "rep" and e[1] == conn and e[2] == num:
                return i, e
        raise AssertionError(f"no reply to request {num}")

    def assert_durable(self, final: str) -> None:
        """A posix-rename onto ``final`` answered OK, then ``final`` or its directory opened, then
        fsynced (OK) on that connection (the directory: batch.Uploads.sync_dirs, once per run)."""
        for i, e in enumerate(self.events):
            if e[0] == "req" and e[3] == CMD_EXTENDED and e[4][0] == "posix-rename@openssh.com" and e[4][2] == final:
                conn = e[1]
                ri, rep = self._reply_of(conn, e[2])
                if rep[3] == CMD_STATUS and rep[4] == SFTP_OK:
                    break
        else:
            raise AssertionError(f"{final} was never renamed into place")
        for j, o in enumerate(self.events):
            if j > ri and o[0] == "req" and o[1] == conn and o[3] == CMD_OPEN and o[4][0] in (
                    final, final.rsplit("/", 1)[0]):
                oi, orep = self._reply_of(conn, o[2])
                if orep[3] != CMD_HANDLE:
                    continue
                for k, s in enumerate(self.events):
                    if (k > oi and s[0] == "req" and s[1] == conn and s[3] == CMD_EXTENDED
                            and s[4][0] == "fsync@openssh.com" and s[4][1] == orep[4]):
                        _, srep = self._reply_of(conn, s[2])
                        assert srep[3] == CMD_STATUS and srep[4] == SFTP_OK
                        return
        raise AssertionError(f"{final} was not fsynced after its rename")


def test_every_stored_object_is_fsynced_after_its_rename(pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """Mutation-checked against Uploads._sync_final (made a no-op; Ops.put runs it too), and
    since the directory fsync against Uploads.sync_dirs's fsync (objects counted without it)."""
    small = [tmp_path / f"s{i}" for i in range(20)]
    for i, p in enumerate(small):
        make_file(p, 1000 + i, seed=i)
    big = tmp_path / "big"
    make_file(big, 5 * 1024 * 1024, seed=99)  # > PIPELINED_MAX: the single-file path
    single = tmp_path / "single"
    make_file(single, 3000, seed=77)
    rec = Recorder(monkeypatch)
    with Session() as s:
        items, out = stash_many(pm, sftp_remote, [*small, big], s)
        assert all(err is None for err in out.values())
        for oid, _, _ in items:  # checked the moment the hook returned
            rec.assert_durable(str(stored(sftp_store, oid)))
        oid, size = hash_file(single)
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=single, size=size, session=s)
        rec.assert_durable(str(stored(sftp_store, oid)))


# -- 3. a cut connection is reported as that, by the real command --------------------------------

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.sshd import _descendants
    import jam_sftp.transfer as transfer, jam_sftp.batch as batch

    state = []

    def signal_server(sig):
        pid = int(os.environ["JAM_TEST_SSHD_PID"])
        for p in [pid, *_descendants(pid)]:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    def stop():  # the server freezes: what we send next stays unread in its socket
        if not state:
            state.append("stopped")
            signal_server(signal.SIGSTOP)

    def after_send():  # then it dies with unread data: the kernel resets the connection
        if state == ["stopped"]:
            state.append("killed")
            signal_server(signal.SIGKILL)

    orig_flush, orig_send = batch.Pipeline.flush, transfer.Replies.send
    def flush(self):
        orig_flush(self)
        after_send()
    def send(self, *args):
        num = orig_send(self, *args)
        after_send()
        return num
    batch.Pipeline.flush, transfer.Replies.send = flush, send

    if os.environ["JAM_TEST_KILL_AT"] == "upload":  # the temporary files are open, no byte sent yet
        orig = batch.Uploads._opened
        def opened(self, f):
            stop()
            return orig(self, f)
        batch.Uploads._opened = opened
    else:  # the first bytes of an object came back
        orig_write = transfer.write_sparse
        def write(fd, data, off):
            stop()
            return orig_write(fd, data, off)
        transfer.write_sparse = batch.write_sparse = write

    from jam_core.cli import main
    sys.exit(main())
    """
)


@pytest.mark.parametrize("at", ["upload", "download"])
def test_cut_connection_is_one_true_line_from_the_command(runner, tmp_path, sshd, sftp_store, monkeypatch, at):
    """The server freezes, gets a request, then dies: the kernel resets the connection, which
    paramiko's transport thread logs as "Socket exception: Connection reset by peer".
    Mutation-checked against quiet_paramiko() and the ConnectionLost wording in Pool.error."""
    tree = sftp_root(runner, tmp_path, sshd, sftp_store, monkeypatch)
    size = 200_000 if at == "upload" else 5 * 1024 * 1024  # a download of the single-file path
    files = {f"d/f{i}.bin": make_file(tree / "d" / f"f{i}.bin", size + i, seed=i) for i in range(4)}
    if at == "download":
        jam(runner, "stash", "d")
    before = {rel: (tree / rel).read_bytes() for rel in files}
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    env = dict(os.environ, JAM_TEST_SSHD_PID=str(sshd.proc.pid), JAM_TEST_KILL_AT=at)
    env.pop("JAM_DEBUG", None)
    cmd = "stash" if at == "upload" else "checkout"
    proc = subprocess.run([sys.executable, str(script), cmd, "d"], cwd=tree, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)
    sshd.kill()  # reap what the script killed
    err = proc.stderr
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "Socket exception" not in err and "authentication" not in err, err
    assert "sftp subsystem" not in err and "lost during transfer" in err, err
    assert "connection to jamtest" in err, err
    for rel in files:  # files safe: untouched local files, or stubs as they were
        assert (tree / rel).read_bytes() == before[rel]
    sshd.start()
    jam(runner, "checkout", "d")
    for rel, data in files.items():
        assert (tree / rel).read_bytes() == data


# -- 4. stale temporary uploads -------------------------------------------------------------------


def test_stale_parts_are_swept_once_and_nothing_else(pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """Mutation-checked against the sweep_tmp call in the stash hooks."""
    tmp = sftp_store / "tmp"
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = part_name().split(".")
    dead_part = tmp / ".".join([mine[0], str(dead.pid), mine[2], "part"])
    fresh_other = tmp / "otherhost.4242.0123456789abcdef.part"
    live_part = tmp / ".".join([mine[0], str(os.getpid()), "fedcba9876543210", "part"])
    user = tmp / "x.part"
    outside = tmp_path / "precious"
    outside.write_text("keep")
    link = tmp / ".".join([mine[0], str(dead.pid), "aaaaaaaaaaaaaaaa", "part"])
    link.symlink_to(outside)
    for p in (dead_part, fresh_other, live_part, user):
        p.write_bytes(b"half an upload")
    make_file(tmp_path / "f", 1000)
    make_file(tmp_path / "g", 1000, seed=1)
    with Session() as s:
        stash_many(pm, sftp_remote, [tmp_path / "f"], s)
        assert not dead_part.exists()
        dead_part.write_bytes(b"again")  # once per command: the second store does not list again
        oid, size = hash_file(tmp_path / "g")
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "g", size=size, session=s)
    assert dead_part.exists()
    assert fresh_other.exists() and live_part.exists() and user.exists()
    assert os.path.islink(link) and outside.read_text() == "keep"
    with Session() as s:  # a new command sweeps again, through the single-object hook
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "g", size=size, session=s)
    assert not dead_part.exists() and user.exists() and os.path.islink(link)


def test_uploads_use_part_names(pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """A part left by an upload cut short carries this process's host and pid (fs.part_name)."""
    from jam_sftp.transfer import Ops

    seen = []
    orig = Ops.tmp_path

    def record(self):
        seen.append(orig(self))
        return seen[-1]

    monkeypatch.setattr(Ops, "tmp_path", record)
    make_file(tmp_path / "f", 1000)
    with Session() as s:
        stash_many(pm, sftp_remote, [tmp_path / "f"], s)
    mine = part_name().split(".")
    assert seen and all(p.rsplit("/", 1)[1].split(".")[:2] == mine[:2] for p in seen)


# -- 5. a full disk fails one object, the others are stored ---------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs as the server's store (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {r.stderr!r}")
        pytest.skip("cannot mount a tmpfs here")
    (mnt / "objects").mkdir()
    (mnt / "tmp").mkdir()
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("big", [3 * 1024 * 1024, 6 * 1024 * 1024], ids=["pipelined", "single"])
def test_full_disk_is_that_objects_failure(pm, sshd, small_disk, tmp_path, big):
    """Mutation-checked against Pool.object_error (returning the RemoteError aborts the batch)."""
    remote = sftp_remote_for(f"sftp://{sshd.alias}{small_disk}")
    a, c, b = tmp_path / "a", tmp_path / "c", tmp_path / "b"
    make_file(a, 256 * 1024, seed=1)
    make_file(c, 256 * 1024, seed=2)
    make_file(b, big, seed=3)
    with Session() as s:
        items, out = stash_many(pm, remote, [a, c, b], s)
    (oid_a, _, size_a), (oid_c, _, size_c), (oid_b, _, _) = items
    assert out[oid_a] is None and out[oid_c] is None
    err = out[oid_b]
    assert isinstance(err, JamError) and not isinstance(err, RemoteError)
    assert "no space" in str(err) and "\n" not in str(err)
    verify_file(stored(small_disk, oid_a), oid_a, size_a)
    verify_file(stored(small_disk, oid_c), oid_c, size_c)
    assert not stored(small_disk, oid_b).exists()
    assert list((small_disk / "tmp").iterdir()) == []  # its part removed


def test_full_disk_through_the_command(runner, tmp_path, sshd, small_disk, monkeypatch):
    tree = sftp_root(runner, tmp_path, sshd, small_disk, monkeypatch)
    small = make_file(tree / "a.bin", 200_000, seed=1)
    big = make_file(tree / "z.bin", 3 * 1024 * 1024, seed=2)
    res = jam(runner, "stash", "a.bin", "z.bin", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "z.bin" in res.stderr and "no space" in res.stderr
    assert (tree / "z.bin").read_bytes() == big  # left local
    os.getxattr(tree / "a.bin", XATTR)  # what fits is stashed
    jam(runner, "checkout", "a.bin")
    assert (tree / "a.bin").read_bytes() == small
    assert list((small_disk / "tmp").iterdir()) == []


# -- 6. sparse fetch ------------------------------------------------------------------------------


def _sparse_file(path: Path, size: int) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(b"x" * 5000)
        f.seek(size - 10)
        f.write(b"end of it!")
    return path.read_bytes()


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 64 * 1024 * 1024], ids=["pipelined", "single"])
def test_fetch_writes_sparse(pm, sftp_remote, tmp_path, size):
    """Mutation-checked against write_sparse (a plain pwrite allocates every block)."""
    data = _sparse_file(tmp_path / "src", size)
    oid, size = hash_file(tmp_path / "src")
    with Session() as s:
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "src", size=size, session=s)
        back = tmp_path / "back"
        back.write_bytes(b"")
        out = pm.hook.fetch_many(remote=sftp_remote, items=[(oid, back, size)], session=s)
        assert out == [(oid, True)]
        assert back.read_bytes() == data
        assert back.stat().st_blocks * 512 <= 64 * 1024
        back2 = tmp_path / "back2"
        back2.write_bytes(b"stale bytes of an earlier try" * 1000)  # emptied first
        assert pm.hook.fetch(remote=sftp_remote, oid=oid, dest=back2, size=size, session=s)
        assert back2.read_bytes() == data and back2.stat().st_blocks * 512 <= 64 * 1024


# -- 7. the identity marker -----------------------------------------------------------------------


def test_remote_id_marker(pm, sftp_remote, sftp_store):
    marker = sftp_store / MARKER_NAME
    with Session() as s:
        assert pm.hook.remote_id(remote=sftp_remote, session=s, create=False) == ""
        assert not marker.exists()
        rid = pm.hook.remote_id(remote=sftp_remote, session=s, create=True)
        assert parse_marker(marker.read_bytes()) == rid
        assert pm.hook.remote_id(remote=sftp_remote, session=s, create=True) == rid  # never replaced
        assert pm.hook.remote_id(remote=sftp_remote, session=s, create=False) == rid
    assert list((sftp_store / "tmp").iterdir()) == []


def test_remote_id_never_replaces_a_marker_made_meanwhile(pm, sftp_remote, sftp_store, monkeypatch):
    """Another jam writes a marker between our look and our link: theirs stands.
    Mutation-checked against Ops.link_new (a posix-rename there replaces theirs)."""
    from jam_core.objects import marker_bytes
    from jam_sftp.transfer import Ops

    theirs = "ab" * 16
    orig = Ops.link_new

    def racing(self, src, dst):
        (sftp_store / MARKER_NAME).write_bytes(marker_bytes(theirs))
        return orig(self, src, dst)

    monkeypatch.setattr(Ops, "link_new", racing)
    with Session() as s:
        assert pm.hook.remote_id(remote=sftp_remote, session=s, create=True) == theirs
    assert parse_marker((sftp_store / MARKER_NAME).read_bytes()) == theirs
    assert list((sftp_store / "tmp").iterdir()) == []


@pytest.mark.parametrize("kind", ["garbage", "huge", "symlink", "directory"])
def test_remote_id_refuses_what_is_not_a_marker(pm, sftp_remote, sftp_store, tmp_path, kind):
    marker = sftp_store / MARKER_NAME
    if kind == "garbage":
        marker.write_bytes(b'{"jam_remote":1,"id":"../../etc"}')
    elif kind == "huge":
        marker.write_bytes(b'{"jam_remote":1,"id":"' + b"a" * 32 + b'"}' + b" " * (1 << 20))
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b'{"jam_remote":1,"id":"%s"}' % (b"c" * 32))
        marker.symlink_to(tmp_path / "elsewhere")
    else:
        marker.mkdir()
    with Session() as s:
        for create in (False, True):
            with pytest.raises(RemoteError, match="not a jam remote marker|not a regular file") as exc:
                pm.hook.remote_id(remote=sftp_remote, session=s, create=create)
            assert "\n" not in str(exc.value)
    assert marker.is_dir() if kind == "directory" else os.path.lexists(marker)


# -- 8. bounded fetch -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["pipelined", "single"])
@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_fetch_never_reads_past_the_size(pm, sftp_remote, sftp_store, tmp_path, monkeypatch, path, change):
    """The server does not report sizes (fstat answers without one), so only the reads can tell:
    an object longer than its size is refused after exactly ``size`` bytes, a shorter one too.
    Mutation-checked against the read past the end (Downloads' past_end, which Ops.get runs too)."""
    from paramiko.sftp_attr import SFTPAttributes

    size = 6 * 1024 * 1024 if path == "single" else 100_000
    data = make_file(tmp_path / "f", size)
    with Session() as s:
        oid, size = hash_file(tmp_path / "f")
        assert pm.hook.stash(remote=sftp_remote, oid=oid, source=tmp_path / "f", size=size, session=s)
    obj = stored(sftp_store, oid)
    obj.chmod(0o644)
    obj.write_bytes(data + b"more bytes" * 100 if change == "longer" else data[:-100])
    no_size = SFTPAttributes()
    from jam_sftp import batch

    orig = batch.Pipeline.attrs
    monkeypatch.setattr(batch.Pipeline, "attrs", staticmethod(
        lambda p, into: orig(p, lambda st: into(None if st is None else no_size))))
    dest = tmp_path / "back"
    dest.write_bytes(b"")
    with Session() as s:
        if path == "single":
            with pytest.raises(IntegrityError, match="wrong size|shorter than its size"):
                pm.hook.fetch(remote=sftp_remote, oid=oid, dest=dest, size=size, session=s)
        else:
            [(got_oid, err)] = pm.hook.fetch_many(remote=sftp_remote, items=[(oid, dest, size)], session=s)
            assert isinstance(err, IntegrityError) and ("wrong size" in str(err) or "shorter" in str(err))
    assert dest.stat().st_size <= size

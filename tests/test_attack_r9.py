"""R9: an attacker's review of tiers and object stores through rclone (S3 on a real SeaweedFS).

Each test injects one fault on real files, a real rclone and a real S3 server. A test marked
``xfail(strict=True, reason="BUG: ...")`` proves a hole (the fix is in the review's report);
the others pass only because of the guard named in their docstring (each was mutation-checked:
that guard commented out, the test failed)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from jam_core.objects import object_relpath
from jam_core.stub import XATTR, StubRecord
from tests.conftest import make_file
from tests.test_sftp_cli import jam  # the same CliRunner wrapper


def is_stub(path) -> bool:
    try:
        os.getxattr(path, XATTR)
        return True
    except OSError:
        return False


def one_clean_line(res) -> str:
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[0].startswith("jam: "), res.stderr
    return "\n".join(lines)


def oid_of(path) -> str:
    return StubRecord.unpack(os.getxattr(path, XATTR)).oid


def clean_rclone(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The rclone CLI against the server, behind jam's back, with none of the RCLONE_* settings
    a test gave jam (a filter or a dry run must not blind the check itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    env.update(server.env("seaweed"), RCLONE_CONFIG="/dev/null")
    return subprocess.run([server.rclone_bin, *args], capture_output=True, env=env, check=check, timeout=120)


def on_server(server, bucket: str, prefix: str, oid: str) -> bytes | None:
    """The object's bytes on the server, read behind jam's back; None if it is not there
    (`rclone cat` of a missing name prints nothing and exits 0: list it first)."""
    path = f"seaweed:{bucket}/{prefix}/objects/{object_relpath(oid)}"
    listed = json.loads(clean_rclone(server, "lsjson", "--files-only", path, check=False).stdout or b"[]")
    if not listed:
        return None
    return clean_rclone(server, "cat", path).stdout


def s3_root(runner, tmp_path, monkeypatch, url: str, name: str = "s3"):
    tree = tmp_path / "tree"
    tree.mkdir()
    jam(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    jam(runner, "remote", "add", name, url)
    jam(runner, "remote", "remove", "default")
    return tree


# -- 1. a stub never points at an object that is not there ------------------------------------

def test_rclone_dry_run_in_the_users_environment_never_makes_a_stub(runner, tmp_path, rclone_env, s3_bucket,
                                                                    monkeypatch):
    """RCLONE_DRY_RUN=true (a user's shell, left from a try of `rclone sync --dry-run`): rclone's
    uploads answer success and store nothing. A file may become a stub only if its object is
    really on the server.
    Guard (mutation-checked): daemon.NO_DRY_RUN on rclone rcd's command line."""
    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam")
    data = make_file(tree / "small.bin", 200_000, seed=1)
    monkeypatch.setenv("RCLONE_DRY_RUN", "true")
    jam(runner, "stash", "small.bin", ok=False)
    if is_stub(tree / "small.bin"):
        got = on_server(rclone_env, s3_bucket, "jam", oid_of(tree / "small.bin"))
        assert got is not None, "a stub whose object is not on the server: the file is lost"
        assert got == data, "a stub whose object holds other bytes"
    else:
        assert (tree / "small.bin").read_bytes() == data


# -- 3. tiers and copies: the same place under two names --------------------------------------

def _twin_by_hand(runner, tmp_path, rclone_env, s3_bucket, monkeypatch, copies: int):
    """'a' added by jam, 'b' written into the config by hand (or by a jam from before `remote
    add` refused it): another rclone name for the same bucket, carrying a's identity."""
    from jam_core.root import Root

    for k, v in rclone_env.env("twin").items():
        monkeypatch.setenv(k, v)
    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam", name="a")
    root = Root(tree)
    a = dict(root.own_config()["remote"]["a"])

    def twin(own):
        own["remote"]["b"] = a | {"url": f"rclone:twin:{s3_bucket}/jam", "location": f"twin:{s3_bucket}/jam"}
        own.setdefault("place", {})["copies"] = copies
    root.update_config(twin)
    return tree


def test_drop_with_a_twin_already_in_the_config_keeps_the_only_copy(runner, tmp_path, rclone_env, s3_bucket,
                                                                    monkeypatch):
    """A config that already names one bucket twice through two rclone remotes (`remote add`
    refuses that now, which does not help configs written before): `jam drop --from a` may not
    count b, whose identity is a's (it was a BUG until c3b858a: the only copy was removed).
    Guard (mutation-checked): copies.remove_copies skips the removed store's other names
    (``r.options.get("id") == me``)."""
    tree = _twin_by_hand(runner, tmp_path, rclone_env, s3_bucket, monkeypatch, copies=1)
    data = make_file(tree / "f.bin", 150_000, seed=6)
    jam(runner, "stash", "f.bin")
    oid = oid_of(tree / "f.bin")
    jam(runner, "drop", "--from", "a", "f.bin", ok=False)
    got = on_server(rclone_env, s3_bucket, "jam", oid)
    assert got is not None, "the only copy of a stub was dropped: the file is lost"
    assert got == data, "differs"



# -- 3. tiers: a copy gone on the near tier, corrupt on the far one ---------------------------

def _overwrite(server, bucket: str, prefix: str, oid: str, data: bytes) -> None:
    server.rclone("rcat", f"seaweed:{bucket}/{prefix}/objects/{object_relpath(oid)}", input=data)


def test_near_copy_gone_and_far_copy_corrupt_leave_the_stub(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """Two tiers on S3 (copies = 2). File x: its tier-0 object deleted, its tier-1 object
    overwritten with other bytes of the same size (S3 keeps no history): checkout must refuse
    it in one `jam:` line, exit 1, the stub as it was. File y: tier 0 overwritten the same way,
    tier 1 intact: checkout falls back and brings the true bytes. Guard: checkout._problem's
    hash of the fetched content (rclone's download checks only the length)."""
    from jam_core.root import Root

    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/near", name="near")
    jam(runner, "remote", "add", "far", f"rclone:seaweed:{s3_bucket}/far", "--tier", "1")
    Root(tree).update_config(lambda own: own.setdefault("place", {}).__setitem__("copies", 2))
    x = make_file(tree / "x.bin", 180_000, seed=11)
    y = make_file(tree / "y.bin", 2 * 1024 * 1024 + 3, seed=12)  # past STAT_MIN: another upload path
    jam(runner, "stash", "x.bin", "y.bin")
    assert jam(runner, "where", "x.bin", "y.bin").output.count("near, far") == 2
    ox, oy = oid_of(tree / "x.bin"), oid_of(tree / "y.bin")
    stub_x = (tree / "x.bin").read_bytes()
    rclone_env.rclone("deletefile", f"seaweed:{s3_bucket}/near/objects/{object_relpath(ox)}")
    _overwrite(rclone_env, s3_bucket, "far", ox, bytes(b ^ 0x5A for b in x))
    _overwrite(rclone_env, s3_bucket, "near", oy, bytes(len(y)))

    res = jam(runner, "checkout", "x.bin", "y.bin", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "x.bin" in res.stderr and "corrupt" in res.stderr, res.stderr
    assert is_stub(tree / "x.bin") and (tree / "x.bin").read_bytes() == stub_x, "the stub was replaced"
    assert not is_stub(tree / "y.bin")
    assert (tree / "y.bin").read_bytes() == y, "y came back with the near tier's corrupt bytes"
    assert StubRecord.unpack(os.getxattr(tree / "x.bin", XATTR)).oid == ox
    assert sorted(p.name for p in tree.iterdir()) == [".jam", "x.bin", "y.bin"], "a temporary was left"


# -- 1. the rclone config changed to point elsewhere -------------------------------------------

def test_rclone_remote_redefined_elsewhere_is_noticed(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """The user's rclone remote ``seaweed`` is redefined (an alias of another bucket, which holds
    another jam remote): same URL, another place. `jam doctor` must report the identity problem
    (exit 1), and a stash must store nothing there and leave the file local. Guard: doctor's
    identity check (its marker's id against the recorded one) and ensure_identity."""
    import uuid

    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from tests.conftest_seaweed import rclone_remote_for

    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam")
    make_file(tree / "old.bin", 100_000, seed=20)
    jam(runner, "stash", "old.bin")
    other = f"jam-{uuid.uuid4().hex[:12]}"
    rclone_env.make_bucket(other)
    elsewhere = rclone_remote_for(f"seaweed:{other}/{s3_bucket}/jam")
    pm = make_plugin_manager(load_entrypoints=False)
    with Session() as s:  # another root's remote, where the redefined name now leads
        pm.hook.check_remote(remote=elsewhere, session=s, create=True)
        pm.hook.remote_id(remote=elsewhere, session=s, create=True)
    for k, v in rclone_env.env("real").items():
        monkeypatch.setenv(k, v)
    for k in rclone_env.env("seaweed"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("RCLONE_CONFIG_SEAWEED_TYPE", "alias")
    monkeypatch.setenv("RCLONE_CONFIG_SEAWEED_REMOTE", f"real:{other}")

    res = jam(runner, "doctor", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "another remote's marker" in res.output + res.stderr, res.output
    data = make_file(tree / "new.bin", 100_000, seed=21)
    res = jam(runner, "stash", "new.bin", ok=False)
    assert res.exit_code != 0 and not is_stub(tree / "new.bin") and (tree / "new.bin").read_bytes() == data
    listed = clean_rclone(rclone_env, "lsf", "-R", f"seaweed:{other}/{s3_bucket}/jam").stdout.decode().split()
    assert listed == ["jam-remote.json"], f"stored into another remote: {listed}"


# -- 1. jam's own rclone killed mid-transfer ---------------------------------------------------

def _rclone_children() -> list[int]:
    """The pids of the rclone processes this (jam) process started."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        if ppid == me and comm == b"rclone":
            out.append(int(name))
    return out


class KillRclone:
    """A progress callback that SIGKILLs jam's own rclone once ``after`` bytes have moved."""

    def __init__(self, after: int):
        self.after, self.seen, self.killed = after, 0, []

    def __call__(self, n: int) -> None:
        import signal

        self.seen += n
        if not self.killed and self.seen >= self.after:
            self.killed = _rclone_children()
            for pid in self.killed:
                os.kill(pid, signal.SIGKILL)


def test_jams_rclone_killed_mid_stash(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """jam's `rclone rcd` is SIGKILLed (found as jam's child) the moment the body of an upload
    was sent, before rclone answered: the file stays local, as it was, and a rerun (a new
    rclone) stashes it with its object whole on the server. Guard: Store._upload takes a
    connection that broke before the answer for a failed store (RemoteError), never a stored
    one (objects under STAT_MIN get no stat after their upload to catch it)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam")
    data = make_file(tree / "f.bin", 900_000, seed=30)  # < STAT_MIN: sent whole, not stat'ed after
    pm = make_plugin_manager(load_entrypoints=False)
    killer = KillRclone(1)
    with Session(progress=killer) as s:
        res = stash(Root(tree), ["f.bin"], pm, s)
    assert killer.killed and res.exit_code != 0
    if is_stub(tree / "f.bin"):
        got = on_server(rclone_env, s3_bucket, "jam", oid_of(tree / "f.bin"))
        assert got is not None, "a stub of an object that is not there"
        assert got == data, "a stub of a partial object"
    else:
        assert (tree / "f.bin").read_bytes() == data, "differs"
    jam(runner, "stash", "f.bin")
    got = on_server(rclone_env, s3_bucket, "jam", oid_of(tree / "f.bin"))
    assert got is not None and got == data, "differs"


# -- 4. rclone missing -------------------------------------------------------------------------

def test_rclone_missing_is_one_clear_line(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """No rclone beside jam's Python and none on PATH (the package uninstalled): a stash says
    so in one `jam:` line, exit 1, and the file stays local. Guard: daemon.find_rclone's check
    (without it rclone "None" is started and the message says nothing of what is missing)."""
    import sys

    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam")
    data = make_file(tree / "f.bin", 100_000, seed=40)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(empty))
    res = jam(runner, "stash", "f.bin", ok=False)
    line = one_clean_line(res)
    assert res.exit_code == 1 and "rclone is not installed" in line, line
    assert not is_stub(tree / "f.bin") and (tree / "f.bin").read_bytes() == data


# -- 2. hostile rclone configs -----------------------------------------------------------------

def test_a_named_rclone_memory_remote_is_refused_at_add(runner, tmp_path, rclone_env, monkeypatch):
    """The user's rclone config names a remote of type ``memory`` (``rclone::memory:`` is refused
    by parse_url, a named one is not): `remote add` must refuse it in one line as it refuses
    the connection string, not answer "Added" for a store that forgets everything when jam's
    rclone stops (the next stash then stops on "identity marker missing; the drive looks
    unplugged", which sends the user looking for a drive).
    Guard (mutation-checked): jam_rclone.check_remote refuses a memory backend."""
    monkeypatch.setenv("RCLONE_CONFIG_MEM_TYPE", "memory")
    tree = tmp_path / "tree"
    tree.mkdir()
    jam(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    res = jam(runner, "remote", "add", "m", "rclone:mem:", ok=False)
    line = one_clean_line(res)
    assert res.exit_code == 2 and "forgets everything" in line, line


# -- 3. tiers: the near tier (S3) down ---------------------------------------------------------

def test_near_s3_tier_down_checkout_falls_back_to_the_far_tier(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """copies = 2 on an S3 tier 0 and a directory tier 1; the S3 server dies: a checkout takes
    every file from tier 1 (byte-identical), and a stash of a new file leaves it local (a mirror
    down stops the stash). Guard: checkout's fallback to the next remote on a RemoteError."""
    from jam_core.root import Root

    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam", name="near")
    far = tmp_path / "far"
    far.mkdir()
    jam(runner, "remote", "add", "far", str(far), "--tier", "1")
    Root(tree).update_config(lambda own: own.setdefault("place", {}).__setitem__("copies", 2))
    files = {f"f{i}.bin": make_file(tree / f"f{i}.bin", 120_000 + i, seed=60 + i) for i in range(3)}
    jam(runner, "stash", *files)
    rclone_env.kill()
    try:
        res = jam(runner, "checkout", *files, ok=False)
        assert res.exit_code == 0, res.stderr
        assert all((tree / rel).read_bytes() == data and not is_stub(tree / rel) for rel, data in files.items())
        new = make_file(tree / "new.bin", 100_000, seed=70)
        res = jam(runner, "stash", "new.bin", ok=False)
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert not is_stub(tree / "new.bin") and (tree / "new.bin").read_bytes() == new
    finally:
        rclone_env.start()


def test_doctor_reports_two_remotes_that_are_one_place(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """A config written before `remote add` refused a second name for one place (or by hand):
    'a' and 'b' lead to one bucket and carry one identity, copies = 2. Every stub is "on two
    remotes"; `jam doctor` must not exit 0 (all well): one disk lost loses everything.
    Guard (mutation-checked): doctor._check_remotes' seen identities."""
    tree = _twin_by_hand(runner, tmp_path, rclone_env, s3_bucket, monkeypatch, copies=2)
    make_file(tree / "f.bin", 150_000, seed=5)
    jam(runner, "stash", "f.bin", ok=False)  # a fixed placement leaves it local (one place, copies = 2)
    res = jam(runner, "doctor", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output


# -- 2. hostile names: a location holding ']' ---------------------------------------------------

def test_a_location_with_a_closing_bracket_works_or_is_refused_plainly(runner, tmp_path, rclone_env, s3_bucket,
                                                                       monkeypatch):
    """``rclone:seaweed:BUCKET/photos [old]/jam`` (a folder named as people name folders): jam
    reads through rclone's ``GET /[fs]/path``, which rclone splits at the first ']' (another
    path). It must round-trip, or be refused in one line that says why, never "its identity
    marker vanished as it was read" (which sends the user hunting for a deleted file).
    Guard (mutation-checked): jam_rclone.parse_url refuses ']'."""
    tree = tmp_path / "tree"
    tree.mkdir()
    jam(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    res = jam(runner, "remote", "add", "s3", f"rclone:seaweed:{s3_bucket}/photos [old]/jam", ok=False)
    if res.exit_code != 0:
        line = one_clean_line(res)
        assert "']'" in line and "vanished" not in line, line  # names the character, not a ghost
        return
    jam(runner, "remote", "remove", "default")
    data = make_file(tree / "f.bin", 150_000, seed=80)
    jam(runner, "stash", "f.bin")
    jam(runner, "checkout", "f.bin")
    assert (tree / "f.bin").read_bytes() == data and not is_stub(tree / "f.bin")


def test_a_server_down_is_not_reported_as_a_file(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """The S3 server is down: the stash stops in one line that says the remote cannot be
    reached, never "is a file not a directory" (a user would go looking for a file where the
    folder should be). rclone probes ``BUCKET/jam`` as a possible file on every new fs unless it
    is given as ``BUCKET/jam/``.
    Guard (mutation-checked): store.Store's fs ends with '/'."""
    tree = s3_root(runner, tmp_path, monkeypatch, f"rclone:seaweed:{s3_bucket}/jam")
    data = make_file(tree / "f.bin", 120_000, seed=90)
    rclone_env.kill()
    try:
        res = jam(runner, "stash", "f.bin", ok=False)
    finally:
        rclone_env.start()
    line = one_clean_line(res)
    assert res.exit_code == 1 and not is_stub(tree / "f.bin") and (tree / "f.bin").read_bytes() == data
    assert "is a file" not in line, line


# -- 1. a server that accepts and never answers -------------------------------------------------

def test_a_silent_endpoint_cannot_hang_the_identity_check_for_minutes(rclone_remote, monkeypatch):
    """Measured by hand (too slow for a test): an endpoint that accepts TCP and never answers
    kept `jam stash` waiting 607 s before "cannot reach it: timed out"; with RCLONE_TIMEOUT=30s
    given to rclone it was still 370 s, and 604 s once rclone's probe of BUCKET/path was skipped
    too (rclone's I/O timeout times the S3 SDK's attempts times its low-level retries), always
    ended by jam's own 600 s socket timeout. daemon.py promises "a server that does not answer
    fails the command within seconds". The first request of every command is the identity
    marker's stat (it moves no data): the socket timeout jam waits on for it is recorded here
    (at getresponse, the request sent) and must be at most 2 minutes.
    Guard (mutation-checked): daemon.call's QUICK_TIMEOUT for _QUICK methods."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_rclone.daemon import _UnixConnection

    seen: list[tuple[str, float | None]] = []
    put, get = _UnixConnection.putrequest, _UnixConnection.getresponse

    def putrequest(self, method, url, *args, **kwargs):
        self._r9_url = url
        return put(self, method, url, *args, **kwargs)

    def getresponse(self):
        seen.append((self._r9_url, self.sock.gettimeout() if self.sock is not None else self.timeout))
        return get(self)

    monkeypatch.setattr(_UnixConnection, "putrequest", putrequest)
    monkeypatch.setattr(_UnixConnection, "getresponse", getresponse)
    pm = make_plugin_manager(load_entrypoints=False)
    with Session() as s:
        assert pm.hook.remote_id(remote=rclone_remote, session=s, create=False)
    stats = [t for url, t in seen if url.startswith("/operations/stat")]
    assert stats, seen
    assert all(t is not None and t <= 120 for t in stats), f"a stat waits up to {max(stats)} s on a silent server"

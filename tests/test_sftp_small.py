"""Many small objects over SFTP (issue 13), against the real loopback sshd.

An upload costs the server ``open``, the writes, ``fsync@openssh.com``, ``close`` and a
``posix-rename``; the rename is made durable once per directory for all the objects of a run
(batch.Uploads.sync_dirs: the directory opened read-only and fsynced, as OpenSSH's sftp-server
allows), not by one more open + fsync + close of every object. A server that cannot open or
fsync a directory gets the per-object fsync of the final name; an object whose rename was not
made durable is never announced stored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from paramiko.sftp import CMD_EXTENDED, CMD_FSTAT, CMD_HANDLE, CMD_OPEN, CMD_STATUS, SFTP_OK, SFTP_OP_UNSUPPORTED

from jam_core.errors import RemoteError
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import verify_file
from tests.conftest import make_file
from tests.test_sftp_parallel import HELPER, spread  # noqa: F401  (a fixture)
from tests.test_sftp_safety import Recorder, stash_many, stored


@pytest.fixture
def pm():
    return make_plugin_manager(load_entrypoints=False)


def small_files(tmp_path: Path, n: int) -> list[Path]:
    paths = [tmp_path / "src" / f"s{i}" for i in range(n)]
    for i, p in enumerate(paths):
        make_file(p, 2000 + i, seed=i)
    return paths


def fsynced(rec: Recorder, store: Path) -> list[str]:
    """The paths (outside ``store/tmp``) whose handle was fsynced with an OK reply, in order."""
    opened: dict[tuple[int, bytes], str] = {}  # (connection, handle) -> path
    asked: dict[tuple[int, int], str] = {}  # (connection, request) -> path
    out = []
    for e in rec.events:
        if e[0] == "req" and e[3] == CMD_OPEN:
            asked[(e[1], e[2])] = e[4][0]
        elif e[0] == "rep" and e[3] == CMD_HANDLE and (e[1], e[2]) in asked:
            opened[(e[1], e[4])] = asked.pop((e[1], e[2]))
        elif e[0] == "req" and e[3] == CMD_EXTENDED and e[4][0] == "fsync@openssh.com":
            asked[(e[1], e[2])] = opened.get((e[1], e[4][1]), "?")
        elif e[0] == "rep" and e[3] == CMD_STATUS and e[4] == SFTP_OK and (e[1], e[2]) in asked:
            path = asked.pop((e[1], e[2]))
            if not path.startswith(str(store / "tmp")):
                out.append(path)
    return out


def test_one_fsync_per_directory_makes_the_renames_durable(pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """Every object is renamed, then its directory fsynced (and the parents of the directories
    the run made), before the hook returns; no per-object open + fsync of the final name, no
    fstat of a small object. Mutation-checked against Uploads.sync_dirs (objects counted
    without the directory run) and against its ``made_in`` (parents of new directories)."""
    paths = small_files(tmp_path, 40)
    rec = Recorder(monkeypatch)
    with Session() as s:
        items, out = stash_many(pm, sftp_remote, paths, s)
    assert all(err is None for err in out.values()), out
    finals = {str(stored(sftp_store, oid)) for oid, _, _ in items}
    dirs = {f.rsplit("/", 1)[0] for f in finals}
    for oid, p, size in items:
        rec.assert_durable(str(stored(sftp_store, oid)))
        verify_file(stored(sftp_store, oid), oid, size)
    synced = fsynced(rec, sftp_store)
    assert not finals & set(synced), "a final name was fsynced one by one"
    assert dirs <= set(synced)
    objects = str(sftp_store / "objects")
    assert {objects, f"{objects}/b3"} <= set(synced), "a directory made by the run was not made durable"
    assert len(synced) == len(set(synced)), "a directory was fsynced twice in one run"
    sent = [e for e in rec.events if e[0] == "req"]
    assert not [e for e in sent if e[3] == CMD_FSTAT]


def refuse(monkeypatch, store: Path, what: str) -> None:
    """The server answers "unsupported" to opening a directory (``what="dirs"``) or to any
    read-only open under ``objects/`` (``what="reads"``: the directories and the final names)."""
    from jam_sftp.pipeline import Pipeline
    from jam_sftp.transfer import SftpStatus

    send = Pipeline.send

    def refusing(self, f, on_reply, t, *args):
        if t == CMD_OPEN and str(args[0]).startswith(str(store / "objects")) and (
                Path(args[0]).is_dir() if what == "dirs" else True):
            def refused(rt, msg, path=args[0]):
                raise SftpStatus(SFTP_OP_UNSUPPORTED, "unsupported", path)

            return send(self, f, refused, t, *args)
        return send(self, f, on_reply, t, *args)

    monkeypatch.setattr(Pipeline, "send", refusing)


def test_a_server_that_cannot_fsync_a_directory_gets_a_fsync_per_object(
        pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """Mutation-checked against sync_dirs's fallback (``super().run(waiting, self._sync_final)``)."""
    paths = small_files(tmp_path, 12)
    rec = Recorder(monkeypatch)
    refuse(monkeypatch, sftp_store, "dirs")  # outside the recorder: it records the refusal
    with Session() as s:
        items, out = stash_many(pm, sftp_remote, paths, s)
    assert all(err is None for err in out.values()), out
    synced = fsynced(rec, sftp_store)
    for oid, _, size in items:
        final = str(stored(sftp_store, oid))
        assert final in synced, "stored without its own fsync"
        rec.assert_durable(final)
        verify_file(stored(sftp_store, oid), oid, size)


def test_an_object_whose_rename_was_not_made_durable_is_never_stored(
        pm, sftp_remote, sftp_store, tmp_path, monkeypatch):
    """Neither the directory nor the final name can be fsynced: no object counts as stored.
    Mutation-checked against sync_dirs's ``if all(job.outcome is True ...)``."""
    paths = small_files(tmp_path, 6)
    refuse(monkeypatch, sftp_store, "reads")
    with Session() as s:
        try:
            _, out = stash_many(pm, sftp_remote, paths, s)
        except RemoteError:
            return  # the batch failed as a whole: nothing announced
    assert all(err is not None for err in out.values()), out


def test_spread_over_connections_each_renames_durable_on_its_own(
        pm, sftp_remote, sftp_store, tmp_path, spread, monkeypatch):  # noqa: F811
    """Several connections share a batch: each object's directory is fsynced on the connection
    that renamed it, after the rename."""
    paths = small_files(tmp_path, 24)
    rec = Recorder(monkeypatch)
    with Session() as s:
        items, out = stash_many(pm, sftp_remote, paths, s)
    assert all(err is None for err in out.values()), out
    assert len({e[1] for e in rec.events if e[0] == "req" and e[3] == CMD_OPEN}) >= 2, "one connection only"
    for oid, _, _ in items:
        rec.assert_durable(str(stored(sftp_store, oid)))


def test_without_fsync_nothing_is_fsynced_and_objects_count_once_renamed(pm, sshd, sftp_store, tmp_path, monkeypatch):
    from tests.conftest_sshd import sftp_remote_for

    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", fsync=False)
    paths = small_files(tmp_path, 8)
    rec = Recorder(monkeypatch)
    with Session() as s:
        items, out = stash_many(pm, remote, paths, s)
    assert all(err is None for err in out.values()), out
    assert not [e for e in rec.events if e[0] == "req" and e[3] == CMD_EXTENDED and e[4][0] == "fsync@openssh.com"]
    for oid, _, size in items:
        verify_file(stored(sftp_store, oid), oid, size)


def test_an_upload_batch_that_fsyncs_is_spread_by_its_count_not_its_bytes(pm, sftp_remote, tmp_path, monkeypatch):
    """64 objects of 2 KB: too few bytes for a second connection by the byte rule, but each
    costs an fsync on the server, and fsyncs of several sftp-servers overlap: the upload asks
    for every connection of the pool (4), the download (no fsync) still for one. Mutation-
    checked against _spread's ``synced`` argument."""
    from jam_sftp import parallel

    wanted: list[int] = []
    orig = parallel.on_connections

    def counting(pool, ops, work, want):
        wanted.append(want)
        return orig(pool, ops, work, want)

    monkeypatch.setattr(parallel, "on_connections", counting)
    paths = small_files(tmp_path, 64)
    with Session() as s:
        items, out = stash_many(pm, sftp_remote, paths, s)
        assert all(err is None for err in out.values()), out
        back = [(oid, tmp_path / f"back{i}", size) for i, (oid, _, size) in enumerate(items)]
        for _, dest, _ in back:
            dest.write_bytes(b"")
        got = dict(pm.hook.fetch_many(remote=sftp_remote, items=back, session=s))
    assert all(v is True for v in got.values()), got
    assert wanted == [4, 1]

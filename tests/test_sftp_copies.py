"""Copies, drop and gc with an sftp mirror on a real OpenSSH server (tests/sshd.py), through
jam's command line: ``[place] copies = 2`` over an sftp remote ``far`` (tier 0, asked first) and
a dir remote ``near`` (tier 1). Faults are injected on the server's disk (a flipped byte, a
symlink) or at the instant of the removal (the server killed inside the ``remove`` hook)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jam_core.cli import main
from jam_core.model import Session
from jam_core.objects import object_relpath
from jam_core.stub import XATTR, StubRecord
from tests.conftest import make_file
from tests.conftest_sshd import sftp_remote_for


def jam(runner, *args, ok=True):
    res = runner.invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, (res.output, res.stderr)
    assert "Traceback" not in res.output and "Traceback" not in (res.stderr or "")
    return res


def oid_of(path: Path) -> str:
    return StubRecord.unpack(os.getxattr(path, XATTR)).oid


def is_stub(path: Path) -> bool:
    try:
        os.getxattr(path, XATTR)
        return True
    except OSError:
        return False


def holds(store: Path, oid: str) -> bool:
    return (store / "objects" / object_relpath(oid)).is_file()


def flip(path: Path) -> None:
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def set_copies(tree: Path, n: int) -> None:
    cfg = tree / ".jam" / "config.toml"
    text = cfg.read_text()
    if "[place]" in text:
        text = text.replace(f"copies = {3 - n}", f"copies = {n}")
    else:
        text += f"\n[place]\ncopies = {n}\n"
    cfg.write_text(text)


def mirrored_root(runner, tmp_path: Path, name: str, sshd, store: Path, near: Path, monkeypatch,
                  copies: int = 2) -> Path:
    """A root with ``far`` (sftp, tier 0) and ``near`` (dir, tier 1) and ``[place] copies``."""
    tree = tmp_path / name
    tree.mkdir()
    jam(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    jam(runner, "remote", "add", "far", f"sftp://{sshd.alias}{store}")
    near.mkdir(exist_ok=True)
    jam(runner, "remote", "add", "near", str(near), "--tier", "1")
    jam(runner, "remote", "remove", "default")
    remotes = json.loads(jam(runner, "remote", "list", "--json").output)
    assert sorted((r["name"], r["kind"]) for r in remotes) == [("far", "sftp"), ("near", "dir")]
    set_copies(tree, copies)
    return tree


@pytest.fixture
def mirrors(runner, tmp_path, sshd, sftp_store, monkeypatch):
    near = tmp_path / "near"
    tree = mirrored_root(runner, tmp_path, "tree", sshd, sftp_store, near, monkeypatch)
    return tree, sftp_store, near


def test_copies_two_store_on_both_and_a_corrupt_mirror_is_survived(runner, mirrors):
    tree, far, near = mirrors
    data = make_file(tree / "f.bin", 300_000, seed=1)
    assert "stashed 1 file" in jam(runner, "stash", "f.bin").output
    oid = oid_of(tree / "f.bin")
    assert holds(far, oid) and holds(near, oid)
    rid = (tree / ".jam" / "config.toml").read_text().split('id = "')[1][:32]
    refs = (far / "meta" / "refs" / rid).read_bytes()
    assert refs.startswith(b"jam-refs 2\ncopies 2\n") and oid.encode() in refs  # write_meta on sftp
    assert os.listdir(far / "tmp") == []

    flip(far / "objects" / object_relpath(oid))  # the nearer mirror is corrupt
    res = jam(runner, "doctor", "--deep", ok=False)
    assert res.exit_code == 1 and "far" in res.output + res.stderr and "corrupt" in (res.output + res.stderr).lower()
    res = jam(runner, "checkout", "f.bin")
    assert (tree / "f.bin").read_bytes() == data and not is_stub(tree / "f.bin")


def test_drop_from_the_sftp_mirror(runner, mirrors):
    tree, far, near = mirrors
    make_file(tree / "f.bin", 300_000, seed=2)
    jam(runner, "stash", "f.bin")
    oid = oid_of(tree / "f.bin")
    res = jam(runner, "drop", "--from", "far", "f.bin", ok=False)  # copies = 2: both are needed
    assert res.exit_code == 1 and holds(far, oid)
    set_copies(tree, 1)

    obj = near / "objects" / object_relpath(oid)
    good = obj.read_bytes()
    flip(obj)  # the other copy is not verified: nothing leaves the sftp mirror
    res = jam(runner, "drop", "--from", "far", "f.bin", ok=False)
    assert res.exit_code == 1 and holds(far, oid)
    obj.write_bytes(good)

    jam(runner, "drop", "--from", "far", "f.bin")
    assert not holds(far, oid) and holds(near, oid)
    assert list((far / "objects").rglob("*.*")) == [] and os.listdir(far / "tmp") == []
    res = jam(runner, "drop", "--from", "near", "f.bin", ok=False)  # the last copy: never
    assert res.exit_code == 1 and holds(near, oid)
    jam(runner, "checkout", "f.bin")
    assert not is_stub(tree / "f.bin")


def test_gc_on_an_sftp_remote_keeps_what_another_root_refers_to(runner, tmp_path, sshd, sftp_store, monkeypatch):
    roots = {}
    for name in ("ra", "rb"):
        tree = tmp_path / name
        tree.mkdir()
        jam(runner, "init", str(tree))
        monkeypatch.chdir(tree)
        jam(runner, "remote", "add", "far", f"sftp://{sshd.alias}{sftp_store}")
        jam(runner, "remote", "remove", "default")
        roots[name] = tree
    ra, rb = roots["ra"], roots["rb"]
    shared = make_file(ra / "shared.bin", 200_000, seed=3)
    (rb / "shared.bin").write_bytes(shared)
    make_file(ra / "mine.bin", 200_000, seed=4)
    monkeypatch.chdir(ra)
    jam(runner, "stash", "shared.bin", "mine.bin")
    monkeypatch.chdir(rb)
    jam(runner, "stash", "shared.bin")
    s_oid, m_oid = oid_of(ra / "shared.bin"), oid_of(ra / "mine.bin")
    assert len(os.listdir(sftp_store / "meta" / "refs")) >= 2
    monkeypatch.chdir(ra)
    jam(runner, "checkout", "shared.bin", "mine.bin")  # ra refers to neither now
    jam(runner, "gc", "--dry-run")
    assert holds(sftp_store, m_oid)
    jam(runner, "gc")
    assert not holds(sftp_store, m_oid) and holds(sftp_store, s_oid)
    monkeypatch.chdir(rb)
    jam(runner, "checkout", "shared.bin")
    assert (rb / "shared.bin").read_bytes() == shared


def test_move_and_remote_remove_from_an_sftp_remote(runner, tmp_path, sshd, sftp_store, monkeypatch):
    """copies = 1: the stash goes to the nearest tier (sftp) only; `jam move` and `jam remote
    remove --move-to` bring its objects to the dir remote and remove them from the server."""
    near = tmp_path / "near"
    tree = mirrored_root(runner, tmp_path, "tree", sshd, sftp_store, near, monkeypatch, copies=1)
    a = make_file(tree / "a.bin", 200_000, seed=6)
    b = make_file(tree / "b.bin", 200_000, seed=7)
    jam(runner, "stash", "a.bin", "b.bin")
    oa, ob = oid_of(tree / "a.bin"), oid_of(tree / "b.bin")
    assert holds(sftp_store, oa) and holds(sftp_store, ob) and not holds(near, oa)
    jam(runner, "move", "--from", "far", "--to", "near", "a.bin")
    assert not holds(sftp_store, oa) and holds(near, oa) and holds(sftp_store, ob)
    res = jam(runner, "remote", "remove", "far", ok=False)  # the only copy of b.bin
    assert res.exit_code == 2 and holds(sftp_store, ob)
    jam(runner, "remote", "remove", "far", "--move-to", "near")
    assert not holds(sftp_store, ob) and holds(near, ob)
    jam(runner, "checkout", "a.bin", "b.bin")
    assert (tree / "a.bin").read_bytes() == a and (tree / "b.bin").read_bytes() == b


@pytest.mark.parametrize("when", ["before", "after"])
def test_server_killed_mid_drop(runner, mirrors, sshd, monkeypatch, when):
    """The server dies at the removal (before the request, or after it, its reply lost):
    drop fails in one line, every file keeps a copy, and the next run completes."""
    import jam_sftp.meta

    tree, far, near = mirrors
    data = make_file(tree / "f.bin", 300_000, seed=5)
    jam(runner, "stash", "f.bin")
    oid = oid_of(tree / "f.bin")
    set_copies(tree, 1)
    real = jam_sftp.meta.Meta.remove
    fired = []

    def dies(self, o):
        fired.append(o)
        if when == "before":
            sshd.kill()
            return real(self, o)
        real_ops_remove = self.ops.remove

        def then_dies(path):
            real_ops_remove(path)
            sshd.kill()
        self.ops.remove = then_dies
        return real(self, o)

    monkeypatch.setattr(jam_sftp.meta.Meta, "remove", dies)
    res = jam(runner, "drop", "--from", "far", "f.bin", ok=False)
    assert fired == [oid] and res.exit_code == 1
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines and all(x.startswith("jam: ") or "far" in x for x in lines), res.stderr
    assert holds(near, oid) and holds(far, oid) == (when == "before")
    monkeypatch.setattr(jam_sftp.meta.Meta, "remove", real)
    sshd.start()
    jam(runner, "drop", "--from", "far", "f.bin")
    assert not holds(far, oid) and holds(near, oid)
    jam(runner, "checkout", "f.bin")
    assert (tree / "f.bin").read_bytes() == data


# -- the hooks on one server, where the kit cannot reach ------------------------------------------

def _sftp(pm_hook, remote, **kw):
    with Session() as s:
        return getattr(pm_hook, kw.pop("hook"))(remote=remote, session=s, **kw)


@pytest.fixture
def pm():
    from jam_core.manager import make_plugin_manager

    return make_plugin_manager(load_entrypoints=False)


@pytest.fixture
def remote(pm, sshd, sftp_store):
    from jam_core.testing.backend import BackendConformance

    r = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")
    BackendConformance.set_up(pm, r)
    return r


def test_an_empty_mount_point_is_not_written_into(pm, remote, sftp_store):
    """The disk behind the location is unmounted under a command under way (the directory is
    there, empty): write_meta makes no meta/ in it, read/list/remove say RemoteError, not absent."""
    from jam_core.errors import RemoteError

    with Session() as s:
        assert pm.hook.read_meta(remote=remote, name="refs/x", session=s) is False
        sftp_store.rename(sftp_store.with_name("unmounted"))
        sftp_store.mkdir()
        for hook, kw in (("write_meta", {"name": "refs/x", "data": b"x"}), ("read_meta", {"name": "refs/x"}),
                         ("list_meta", {"prefix": "refs"}),
                         ("remove", {"oid": "b3:" + "0" * 64})):
            with pytest.raises(RemoteError) as exc:
                getattr(pm.hook, hook)(remote=remote, session=s, **kw)
            assert "far" in str(exc.value) and "\n" not in str(exc.value)
    assert os.listdir(sftp_store) == []


def test_remove_leaves_a_symlink_in_an_objects_place(pm, remote, sftp_store, tmp_path):
    """A symlink where an object should be is not jam's object: remove answers False and
    neither it nor its target is touched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    oid = "b3:" + "ab" * 32
    place = sftp_store / "objects" / object_relpath(oid)
    place.parent.mkdir(parents=True)
    place.symlink_to(victim)
    with Session() as s:
        assert pm.hook.remove(remote=remote, oid=oid, session=s) is False
    assert place.is_symlink() and victim.read_bytes() == b"precious"


def test_remove_never_goes_through_a_symlinked_fan_out_directory(pm, remote, sftp_store, tmp_path):
    """objects/b3/ab replaced by a symlink to another directory: remove refuses (RemoteError)
    and the file over there stays."""
    from jam_core.errors import RemoteError

    oid = "b3:" + "cd" * 32
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / oid[3:]).write_bytes(b"someone else's")
    (sftp_store / "objects" / "b3").mkdir()
    (sftp_store / "objects" / "b3" / "cd").symlink_to(elsewhere)
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.remove(remote=remote, oid=oid, session=s)
    assert "symlink" in str(exc.value)
    assert (elsewhere / oid[3:]).read_bytes() == b"someone else's"


def test_free_space_is_the_servers_statvfs_or_none(pm, remote, sftp_store, monkeypatch):
    import paramiko

    with Session() as s:
        free = pm.hook.free_space(remote=remote, session=s)
    st = os.statvfs(sftp_store)
    assert isinstance(free, int) and abs(free - st.f_bavail * st.f_frsize) < 64 << 20
    real = paramiko.SFTPClient.__init__

    def without_statvfs(self, *a, **kw):
        real(self, *a, **kw)
        self.extensions = {k: v for k, v in self.extensions.items() if k != "statvfs@openssh.com"}

    monkeypatch.setattr(paramiko.SFTPClient, "__init__", without_statvfs)
    with Session() as s:
        assert pm.hook.free_space(remote=remote, session=s) is None


def test_write_meta_needs_posix_rename(pm, remote, sftp_store, monkeypatch):
    """Without posix-rename@openssh.com a replace cannot be atomic: refused in one line, the old
    content stays."""
    import paramiko

    from jam_core.errors import RemoteError

    with Session() as s:
        assert pm.hook.write_meta(remote=remote, name="refs/x", data=b"old", session=s) is True
    real = paramiko.SFTPClient.__init__

    def without(self, *a, **kw):
        real(self, *a, **kw)
        self.extensions = {k: v for k, v in self.extensions.items() if k != "posix-rename@openssh.com"}

    monkeypatch.setattr(paramiko.SFTPClient, "__init__", without)
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.write_meta(remote=remote, name="refs/x", data=b"new", session=s)
    assert "posix-rename" in str(exc.value)
    assert (sftp_store / "meta" / "refs" / "x").read_bytes() == b"old"
    assert os.listdir(sftp_store / "tmp") == []

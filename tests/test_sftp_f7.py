"""The sftp backend's answers about a copy it holds (``has``, ``hash_object``) and its reading
of known_hosts, on a real OpenSSH server (tests/sshd.py). Faults are made on the server's disk
(a symlink, a FIFO, a symlinked ``objects/``) or in known_hosts (lines ssh skips or refuses).

Each test names the guard it was mutation-checked against (the guard taken out, it fails)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from jam_core import RemoteError
from jam_core.model import Session
from jam_core.objects import hash_file, object_relpath
from tests.conftest_sshd import sftp_remote_for


@pytest.fixture
def pm():
    from jam_core.manager import make_plugin_manager

    return make_plugin_manager(load_entrypoints=False)


def _stored(pm, remote, tmp_path: Path, data: bytes, name: str = "src") -> tuple[str, int]:
    src = tmp_path / name
    src.write_bytes(data)
    oid, size = hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s) is True
    return oid, size


def _ask(pm, remote, hook: str, oid: str, size: int):
    with Session() as s:
        return getattr(pm.hook, hook)(remote=remote, oid=oid, size=size, session=s)


def test_a_symlink_to_an_intact_copy_in_an_objects_place_is_not_a_copy(pm, sftp_remote, sftp_store, tmp_path):
    """The server's object replaced by a symlink to a file with the very same bytes (outside the
    store: a restore gone wrong, or a hand-made "dedup"). Its bytes hash right, but it is not
    this remote's copy (remove() leaves it, list_objects leaves it out; its target may go at
    any time): has() and hash_object() both say False, and an intact object is still seen.
    Guards (mutation-checked): Ops.has's lstat + S_ISREG (a stat: True) and Ops.hash_object's
    S_ISREG of the lstat (taken out: the target is opened and hashes to the id)."""
    data = os.urandom(200_000)
    oid, size = _stored(pm, sftp_remote, tmp_path, data)
    assert _ask(pm, sftp_remote, "has", oid, size) is True
    assert _ask(pm, sftp_remote, "hash_object", oid, size) == oid
    obj = sftp_store / "objects" / object_relpath(oid)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(data)
    obj.chmod(0o644)
    obj.unlink()
    obj.symlink_to(elsewhere)
    assert _ask(pm, sftp_remote, "has", oid, size) is False
    assert _ask(pm, sftp_remote, "hash_object", oid, size) is False
    assert elsewhere.read_bytes() == data and obj.is_symlink(), "differs"


def test_a_fifo_in_an_objects_place_is_never_opened(pm, sshd, sftp_store, tmp_path):
    """A FIFO where an object should be (someone's mkfifo on the server): opening it would hang
    the server's sftp-server until the read timeout. hash_object answers False at once, from
    the lstat. Guards (mutation-checked): Ops.hash_object's S_ISREG of the lstat (taken out, the
    open blocks and the command fails after io_timeout with "no answer"), Ops.has's S_ISREG."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}", io_timeout=5)
    oid = "b3:" + "cd" * 32
    place = sftp_store / "objects" / object_relpath(oid)
    place.parent.mkdir(parents=True)
    os.mkfifo(place)
    assert _ask(pm, remote, "hash_object", oid, 0) is False  # a FIFO's size is 0: only its type tells
    assert _ask(pm, remote, "has", oid, 0) is False


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_hash_object_through_a_symlinked_objects_directory_is_not_a_copy(pm, sshd, sftp_store, depth,
                                                                         tmp_path_factory, tmp_path):
    """Two remotes on one server, far2's objects/ (or its fan-out directory objects/b3, or
    objects/b3/xx) a symlink to far's (an admin merged the stores): far2 "holds" far's object
    only through far's directory; counted as a copy, a drop from far would remove the only
    one. Guard (mutation-checked): Ops.hash_object's S_ISDIR of the lstat of objects/ and of
    each fan-out directory (taken out: far2 answers the id)."""
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    far = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")
    oid, size = _stored(pm, far, tmp_path, os.urandom(100_000))
    store2 = tmp_path_factory.mktemp("store2")
    (store2 / "tmp").mkdir()
    rel = Path("objects", *object_relpath(oid).split("/")[:depth])
    (store2 / rel).parent.mkdir(parents=True, exist_ok=True)
    (store2 / rel).symlink_to(sftp_store / rel)
    far2 = sftp_remote_for(f"sftp://{sshd.alias}{store2}", name="far2")
    assert _ask(pm, far, "hash_object", oid, size) == oid
    assert _ask(pm, far2, "hash_object", oid, size) is False


def test_hash_object_reads_a_large_object_and_says_when_it_is_longer(pm, sftp_remote, sftp_store, tmp_path):
    """An object of several read requests (hashed in order) hashes to its id; grown by one
    byte on the server, it is an IntegrityError of one line naming the remote, not a copy."""
    from jam_core import IntegrityError
    from jam_sftp import transfer

    oid, size = _stored(pm, sftp_remote, tmp_path, os.urandom(3 * transfer.REQUEST + 12_345))
    assert _ask(pm, sftp_remote, "hash_object", oid, size) == oid
    obj = sftp_store / "objects" / object_relpath(oid)
    obj.chmod(0o644)
    with open(obj, "ab") as f:
        f.write(b"x")
    with pytest.raises(IntegrityError) as exc:
        _ask(pm, sftp_remote, "hash_object", oid, size)
    assert "far" in str(exc.value) and "\n" not in str(exc.value)


# -- known_hosts ---------------------------------------------------------------------------------


def _connect(pm, remote) -> None:
    with Session() as s:
        assert pm.hook.check_remote(remote=remote, session=s, create=False)


def _kh() -> Path:
    return Path(os.environ["HOME"]) / ".ssh" / "known_hosts"


def _ssh_ok(sshd) -> bool:
    kh = _kh()
    res = subprocess.run(["ssh", "-F", str(kh.parent / "config"), "-o", "BatchMode=yes",
                          "-o", f"UserKnownHostsFile={kh}", sshd.alias, "true"],
                         capture_output=True, text=True, timeout=60)
    return res.returncode == 0


def test_an_old_key_line_before_the_servers_key_does_not_hide_it(pm, sshd, sftp_remote, tmp_path):
    """known_hosts has an old key of the server (same type: a reinstall whose old line was
    never removed) and then its current one. ssh connects (any line for the host with that key
    will do); so does jam. Guard (mutation-checked): KnownHosts.holds looks at every line for
    the host (the first line's key only: "HOST KEY CHANGED")."""
    from tests.sshd import keygen

    old = keygen(tmp_path / "old_host_key").split()
    pattern = sshd.known_hosts_line().split()[0]
    _kh().write_text(f"{pattern} {old[0]} {old[1]}\n{sshd.known_hosts_line()}\n")
    assert _ssh_ok(sshd)
    _connect(pm, sftp_remote)


def test_garbage_and_unknown_key_types_are_skipped_line_by_line(pm, sshd, sftp_remote):
    """Lines ssh skips (an unknown key type, broken base64, too few fields, an unknown marker)
    before the server's key, hashed (HashKnownHosts): each is skipped alone and the hashed line
    after them is found."""
    import paramiko

    pattern, kind, b64 = sshd.known_hosts_line().split()
    _kh().write_text(
        f"otherhost ssh-unknown-type {b64}\n"
        f"otherhost {kind} !!!not-base64!!!\n"
        "lonely-field\n"
        f"@future-marker {pattern} {kind} {b64}\n"
        f"{paramiko.HostKeys.hash_host(pattern)} {kind} {b64}\n"
    )
    assert _ssh_ok(sshd)
    _connect(pm, sftp_remote)


def test_a_revoked_key_is_refused_whatever_the_line_order_and_host_pattern(pm, sshd, sftp_remote):
    """The server's key marked ``@revoked`` before its trusted line, under a wildcard host
    pattern (``@revoked * ...``: the usual way to revoke a key everywhere): refused with one
    line saying so, as ssh does."""
    line = sshd.known_hosts_line()
    _, kind, b64 = line.split()
    _kh().write_text(f"@revoked * {kind} {b64}\n{line}\n")
    assert not _ssh_ok(sshd)
    with Session() as s, pytest.raises(RemoteError) as exc:
        pm.hook.check_remote(remote=sftp_remote, session=s, create=False)
    assert "REVOKED HOST KEY" in str(exc.value) and "\n" not in str(exc.value)


# -- doctor --deep on an sftp remote (hash_object is its read-back now) ---------------------------


def test_doctor_deep_fix_repairs_a_corrupt_sftp_copy(runner, tmp_path, sshd, sftp_store, monkeypatch):
    """far (sftp) and near (dir) hold f.bin; on the server its copy has a flipped byte.
    `jam doctor --deep` (hash_object reads far's copy back) names the corrupt copy on far (exit
    1); `--deep --fix` copies it again from near and reads it back there; a second `--deep`
    finds all well, and far's copy has the right bytes."""
    from tests.conftest import make_file
    from tests.test_sftp_copies import flip, jam, mirrored_root, oid_of

    near = tmp_path / "near"
    tree = mirrored_root(runner, tmp_path, "tree", sshd, sftp_store, near, monkeypatch)
    make_file(tree / "f.bin", 300_000, seed=11)
    jam(runner, "stash", "f.bin")
    oid = oid_of(tree / "f.bin")
    place = sftp_store / "objects" / object_relpath(oid)
    flip(place)
    res = jam(runner, "doctor", "--deep", ok=False)
    out = res.output + (res.stderr or "")
    assert res.exit_code == 1 and "remote 'far' holds a corrupt copy" in out, out
    res = jam(runner, "doctor", "--deep", "--fix", ok=False)
    assert "copied again from 'near' (fixed)" in res.output, res.output
    res = jam(runner, "doctor", "--deep")  # exit 0
    assert "corrupt" not in res.output and "read back and hashed 2 copies" in res.output, res.output
    assert hash_file(place)[0] == oid

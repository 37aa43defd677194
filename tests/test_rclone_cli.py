"""jam's command line with an rclone remote on a real S3 server (SeaweedFS through rclone's s3
backend): remote add (a configured remote and a connection string), stash, status, checkout
byte-identical, and the server killed mid-transfer (nothing lost)."""

from __future__ import annotations

import json
import os

from jam_core.objects import object_relpath
from jam_core.stub import XATTR, StubRecord
from tests.conftest import make_file
from tests.test_sftp_cli import jam  # the same CliRunner wrapper


def one_clean_line(res) -> str:
    assert res.exit_code != 0 and "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("jam: "), lines[0]
    return lines[0]


def is_stub(path) -> bool:
    try:
        os.getxattr(path, XATTR)
        return True
    except OSError:
        return False


def s3_root(runner, tmp_path, url, monkeypatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    jam(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    res = jam(runner, "remote", "add", "s3", url)
    assert "Added remote 's3'" in res.output, res.output
    jam(runner, "remote", "remove", "default")
    remotes = json.loads(jam(runner, "remote", "list", "--json").output)
    assert [(r["name"], r["kind"]) for r in remotes] == [("s3", "rclone")]
    return tree


def test_stash_status_checkout_through_rclone(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    tree = s3_root(runner, tmp_path, f"rclone:seaweed:{s3_bucket}/jam", monkeypatch)
    files = {f"d/f{i}.bin": make_file(tree / "d" / f"f{i}.bin", 70_000 + i, seed=i) for i in range(40)}
    files["big.bin"] = make_file(tree / "big.bin", 9 * 1024 * 1024 + 5, seed=99)
    res = jam(runner, "stash", "d", "big.bin")
    assert "stashed 41 files" in res.output
    for rel, data in files.items():  # on the server, read behind jam's back
        rec = StubRecord.unpack(os.getxattr(tree / rel, XATTR))
        got = rclone_env.rclone("cat", f"seaweed:{s3_bucket}/jam/objects/{object_relpath(rec.oid)}").stdout
        assert got == data, rel
    assert rclone_env.rclone("lsf", f"seaweed:{s3_bucket}/jam/tmp").stdout == b""
    status = json.loads(jam(runner, "status", "--json").output)
    assert "41" in json.dumps(status)
    res = jam(runner, "checkout", ".")
    assert "checked out 41 files" in res.output
    for rel, data in files.items():
        assert (tree / rel).read_bytes() == data and not is_stub(tree / rel)


def test_connection_string_remote(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """rclone's connection strings (no rclone config at all): rclone::s3,...:bucket/path."""
    for k in rclone_env.env("seaweed"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("RCLONE_S3_ACCESS_KEY_ID", "jamtest")  # credentials from the environment
    monkeypatch.setenv("RCLONE_S3_SECRET_ACCESS_KEY", "jamtest-secret")
    url = f"rclone::s3,provider=SeaweedFS,endpoint='{rclone_env.endpoint}':{s3_bucket}/cs"
    tree = s3_root(runner, tmp_path, url, monkeypatch)
    data = make_file(tree / "f.bin", 300_000, seed=5)
    assert "stashed 1 file" in jam(runner, "stash", "f.bin").output
    assert is_stub(tree / "f.bin")
    jam(runner, "checkout", "f.bin")
    assert (tree / "f.bin").read_bytes() == data


def test_remote_add_mistakes(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    jam(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    cases = {
        "rclone:": "name a remote",
        "rclone:/srv/jam": "no remote named",
        "rclone::local:/srv/jam": "`dir` remote",
        f"rclone::s3,provider=Minio,secret_access_key=hunter2:{s3_bucket}": "holds a secret",
        f"rclone:seaweed:{s3_bucket}-missing/x": "missing",  # a bucket that is not there: not made
        "rclone:nosuchremote:bucket": "s3",
    }
    for url, words in cases.items():
        res = jam(runner, "remote", "add", "s3", url, ok=False)
        line = one_clean_line(res)
        assert res.exit_code in (1, 2)
        if words != "s3":
            assert words in line, (url, line)
        assert "hunter2" not in line
    assert rclone_env.bucket_exists(s3_bucket) and not rclone_env.bucket_exists(f"{s3_bucket}-missing"), \
        "jam created a bucket"
    remotes = json.loads(jam(runner, "remote", "list", "--json").output)
    assert [r["name"] for r in remotes] == ["default"]


class KillAfter:
    """A progress callback that kills the S3 server once ``after`` bytes have moved."""

    def __init__(self, server, after: int):
        self.server, self.after, self.seen, self.fired = server, after, 0, False

    def __call__(self, n: int) -> None:
        self.seen += n
        if not self.fired and self.seen >= self.after:
            self.fired = True
            self.server.kill()


def test_server_killed_mid_transfer(runner, tmp_path, rclone_env, s3_bucket, monkeypatch):
    """The S3 server dies while a stash and then a checkout move data: every file stays local
    or becomes a stub whose object is whole; every stub stays the stub it was; after a restart
    both complete and the round trip is byte-identical."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.checkout import checkout
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    tree = s3_root(runner, tmp_path, f"rclone:seaweed:{s3_bucket}/jam", monkeypatch)
    files = {f"d/f{i:03}.bin": make_file(tree / "d" / f"f{i:03}.bin", 65536 + i, seed=i) for i in range(120)}
    files["d/big.bin"] = make_file(tree / "d" / "big.bin", 24 * 1024 * 1024, seed=7)
    total = sum(len(d) for d in files.values())
    pm = make_plugin_manager(load_entrypoints=False)

    killer = KillAfter(rclone_env, total // 3)
    with Session(progress=killer) as s:
        res = stash(Root(tree), ["d"], pm, s)
    assert killer.fired and res.exit_code != 0
    stubs = [rel for rel in files if is_stub(tree / rel)]
    assert len(stubs) < len(files)
    for rel, data in files.items():
        if rel not in stubs:
            assert (tree / rel).read_bytes() == data  # left local, untouched
    rclone_env.start()
    for rel in stubs:  # stubbed before the kill: the object on the server is whole
        rec = StubRecord.unpack(os.getxattr(tree / rel, XATTR))
        assert rclone_env.rclone("cat", f"seaweed:{s3_bucket}/jam/objects/{object_relpath(rec.oid)}").stdout == files[rel]
    jam(runner, "stash", "d")
    assert all(is_stub(tree / rel) for rel in files)

    before = {rel: (tree / rel).read_bytes() for rel in files}
    killer = KillAfter(rclone_env, total // 3)
    with Session(progress=killer) as s:
        res = checkout(Root(tree), ["d"], pm, s)
    assert killer.fired and res.exit_code != 0
    for rel, data in files.items():
        if is_stub(tree / rel):
            assert (tree / rel).read_bytes() == before[rel]  # the stub as it was
        else:
            assert (tree / rel).read_bytes() == data
    assert not [p for p in (tree / "d").iterdir() if not p.name.endswith(".bin")]  # no temporary left
    rclone_env.start()
    jam(runner, "checkout", "d")
    for rel, data in files.items():
        assert (tree / rel).read_bytes() == data and not is_stub(tree / rel)

"""`jam doctor`: proves stubs can come back, finds what cannot, repairs what it can."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from jam_core.catalog import Catalog
from jam_core.cli import main
from jam_core.stub import XATTR
from tests.conftest import make_file


def doctor(runner, *args):
    res = runner.invoke(main, ["doctor", "--json", *args], catch_exceptions=False)
    return res.exit_code, json.loads(res.output)


def objects(root):
    return [p for p in (Path(root.remotes()[0].location) / "objects").rglob("*") if p.is_file()]


def test_healthy_root_passes(runner, jam_root):
    make_file(jam_root.path / "a.bin", 100_000)
    runner.invoke(main, ["stash", "a.bin"])
    code, out = doctor(runner)
    assert (code, out["ok"], out["stubs"], out["problems"]) == (0, True, 1, [])
    code, out = doctor(runner, "--deep")
    assert (code, out["ok"]) == (0, True)


def test_missing_object_is_reported(runner, jam_root):
    make_file(jam_root.path / "a.bin", 100_000)
    runner.invoke(main, ["stash", "a.bin"])
    for p in objects(jam_root):
        p.unlink()
    code, out = doctor(runner)
    assert code == 1
    assert [(p["kind"], p["path"]) for p in out["problems"]] == [("missing", "a.bin")]


def test_vanished_remote_is_reported_not_recreated(runner, jam_root):
    make_file(jam_root.path / "a.bin", 100_000)
    runner.invoke(main, ["stash", "a.bin"])
    location = Path(jam_root.remotes()[0].location)
    location.rename(location.with_name("elsewhere"))
    code, out = doctor(runner)
    assert code == 1
    kinds = {p["kind"] for p in out["problems"]}
    assert kinds == {"unreachable", "missing"}
    assert not location.exists()


def test_copy_without_xattrs_is_recognised_and_repaired(runner, jam_root):
    data = make_file(jam_root.path / "a.bin", 300_000, 4)
    runner.invoke(main, ["stash", "a.bin"])
    # a plain copy (GNU cp keeps holes, drops xattrs), as some sync tools do
    subprocess.run(["cp", "--sparse=always", "a.bin", "copy.bin"], check=True)
    assert XATTR not in os.listxattr("copy.bin")
    code, out = doctor(runner)
    assert code == 1 and [(p["kind"], p["path"]) for p in out["problems"]] == [("lost-xattr", "copy.bin")]
    code, out = doctor(runner, "--fix")
    assert code == 0 and out["problems"][0]["fixed"] is True
    res = runner.invoke(main, ["checkout", "copy.bin", "a.bin"], catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    assert Path("copy.bin").read_bytes() == data == Path("a.bin").read_bytes()


def test_moved_stub_still_checks_out_and_fix_rebuilds_catalog(runner, jam_root):
    data = make_file(jam_root.path / "old" / "a.bin", 100_000, 5)
    runner.invoke(main, ["stash", "old"])
    os.makedirs("new")
    os.rename("old/a.bin", "new/moved.bin")
    code, out = doctor(runner, "--fix")
    assert code == 0
    with Catalog(jam_root.jam_dir / "catalog.db") as cat:
        assert list(cat.stubs()) == ["new/moved.bin"]
    assert runner.invoke(main, ["checkout", "new"]).exit_code == 0
    assert Path("new/moved.bin").read_bytes() == data


def test_lost_catalog_is_rebuilt(runner, jam_root):
    data = make_file(jam_root.path / "a.bin", 100_000, 6)
    runner.invoke(main, ["stash", "a.bin"])
    for p in jam_root.jam_dir.glob("catalog.db*"):
        p.unlink()
    code, out = doctor(runner, "--fix")
    assert code == 0 and out["stubs"] == 1
    assert runner.invoke(main, ["checkout", "a.bin"]).exit_code == 0
    assert Path("a.bin").read_bytes() == data


def test_doctor_human_output(runner, jam_root):
    make_file(jam_root.path / "a.bin", 100_000)
    runner.invoke(main, ["stash", "a.bin"])
    res = runner.invoke(main, ["doctor"])
    assert res.exit_code == 0 and "all can come back" in res.output
    shutil.rmtree(objects(jam_root)[0].parent)
    res = runner.invoke(main, ["doctor"])
    assert res.exit_code == 1 and "missing: a.bin" in res.output


def test_stub_overwritten_in_full_is_reported(runner, jam_root):
    """A stub made writable and overwritten with new bytes looks like a local file to a
    stat; doctor reads every xattr and reports it (invariant 5), checkout leaves it alone."""
    make_file(jam_root.path / "a.bin", 100_000, 7)
    runner.invoke(main, ["stash", "a.bin"])
    os.chmod("a.bin", 0o644)
    new = make_file(jam_root.path / "a.bin", 100_000, 8)
    code, out = doctor(runner)
    assert code == 1 and [(p["kind"], p["path"]) for p in out["problems"]] == [("dirty", "a.bin")]
    assert runner.invoke(main, ["checkout", "a.bin"]).exit_code == 0
    assert Path("a.bin").read_bytes() == new


def test_doctor_and_status_leave_last_use_alone(runner, jam_root):
    """Looking is not using: doctor reads the first block of every local file (a copy of a stub
    that lost its xattrs is recognised that way), and the age and lru policies read atime as the
    last use. A file not touched for ten days must not look used after a doctor or a status."""
    import pytest

    path = jam_root.path / "old.bin"
    make_file(path, 100_000)
    month, ten_days = 30 * 86400, 10 * 86400
    now = int(os.stat(path).st_mtime)
    sentinel = jam_root.path / "sentinel.bin"
    make_file(sentinel, 100_000)
    for p in (path, sentinel):
        os.utime(p, (now - ten_days, now - month))
    with open(sentinel, "rb") as f:
        f.read(4096)
    if os.stat(sentinel).st_atime > now - ten_days + 1:
        os.utime(sentinel, (now - ten_days, now - month))
    else:
        pytest.skip("this file system does not record reads in atime (noatime): nothing to protect")
    for args in (["doctor"], ["doctor", "--deep"], ["status"]):
        runner.invoke(main, args, catch_exceptions=False)
        assert int(os.stat(path).st_atime) == now - ten_days, args

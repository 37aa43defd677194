"""Every answer of the command line is true: exit codes, one line for each mistake, a closed
pipe that ends jam quietly, the catalog and a full disk as one line, plurals."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess

import pytest

from jam_core.cli import main
from tests.conftest import make_file


def jam(runner, *args, code=0):
    res = runner.invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, (res.output, res.stderr)
    return res


def one_line(res) -> str:
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("jam: ")
    return lines[0]


# -- paths that do not exist are usage errors, for every command that takes paths ------------

@pytest.mark.parametrize("command", ["stash", "checkout", "status", "doctor", "pin", "unpin"])
def test_a_missing_path_is_a_usage_error(runner, jam_root, command):
    make_file(jam_root.path / "real.bin", 100_000)
    res = jam(runner, command, "nope", code=2)
    assert one_line(res) == "jam: nope: no such file or directory"
    if command not in ("status", "doctor"):  # these take one path
        res = jam(runner, command, "real.bin", "nope/deeper", code=2)
        assert "nope/deeper: no such file or directory" in one_line(res)
    assert (jam_root.path / "real.bin").stat().st_size == 100_000  # nothing half-done


@pytest.mark.parametrize("command", ["stash", "checkout", "status", "doctor", "pin", "unpin"])
def test_a_path_too_long_is_an_error_not_silence(runner, jam_root, command):
    long = "x" * 300  # one name longer than NAME_MAX (255)
    res = jam(runner, command, long, code=2)
    line = one_line(res)
    assert "file name too long" in line and len(line) < 200
    longer = "/".join(["y" * 200] * 25)  # a path longer than PATH_MAX (4096)
    assert "file name too long" in one_line(jam(runner, command, longer, code=2))


def test_checkout_needs_a_path_like_stash(runner, jam_root):
    make_file(jam_root.path / "a.bin", 100_000)
    jam(runner, "stash", "a.bin")
    res = jam(runner, "checkout", code=2)
    assert "name the files or directories to check out" in one_line(res)
    assert os.stat(jam_root.path / "a.bin").st_blocks * 512 < 100_000  # still a stub
    assert "checked out 1 file (" in jam(runner, "checkout", ".").output


def test_checkout_keep_both_reaches_the_library(runner, jam_root, monkeypatch):
    import jam_core.ops.checkout
    from jam_core.ops.common import Result

    seen = []

    def fake(root, rels, pm, session=None, **options):
        seen.append((rels, options))
        return Result()

    monkeypatch.setattr(jam_core.ops.checkout, "checkout", fake)
    jam(runner, "checkout", "--keep-both", ".")
    jam(runner, "checkout", ".")
    assert seen == [(["."], {"keep_both": True}), (["."], {})]
    assert "--keep-both" in jam(runner, "checkout", "--help").output


def test_checkout_that_skipped_a_dirty_stub_is_partly_done(runner, jam_root):
    make_file(jam_root.path / "a.bin", 100_000, 1)
    make_file(jam_root.path / "b.bin", 100_000, 2)
    jam(runner, "stash", ".")
    p = jam_root.path / "a.bin"
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(50_000)
        f.write(b"my edits")
    res = jam(runner, "checkout", ".", code=1)
    assert "a.bin" in res.stderr and "checked out 1 file" in res.output


# -- a closed stdout ends jam quietly -------------------------------------------------------

def test_status_into_head_ends_quietly(jam_bin, jam_root):
    for i in range(3000):  # far more output than a pipe holds (a line for each directory with a file)
        (jam_root.path / f"directory-with-a-longish-name-{i:05}").mkdir()
        (jam_root.path / f"directory-with-a-longish-name-{i:05}" / "f").write_bytes(b"x")
    out = subprocess.run(f"'{jam_bin}' status | head -1; echo \"${{PIPESTATUS[0]}}\"", shell=True,
                         executable="/bin/bash", cwd=jam_root.path, capture_output=True, text=True,
                         timeout=120)
    first, code = out.stdout.splitlines()
    assert first.split()[:2] == ["directory", "local"]
    assert out.stderr == ""  # no "jam: Broken pipe", no "Exception ignored"
    assert code == "141"  # as a tool that SIGPIPE ended


# -- the backstop: what escapes as sqlite or OSError is one line with what to do --------------

@pytest.mark.parametrize("exc, says", [
    (sqlite3.OperationalError("database is locked"), "locked by another process"),
    (sqlite3.DatabaseError("file is not a database"), "`jam doctor --fix` rebuilds it"),
    (sqlite3.DatabaseError("database disk image is malformed"), "`jam doctor --fix` rebuilds it"),
    (sqlite3.OperationalError("disk I/O error"), "check the disk"),
    (sqlite3.OperationalError("database or disk is full"), "no space left on the local disk"),
    (OSError(errno.ENOSPC, "No space left on device", "/r/.jam/tmp/x.part"),
     "no space left on the local disk (writing /r/.jam/tmp/x.part)"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the local disk"),
])
def test_escaping_errors_are_one_line(runner, jam_root, monkeypatch, exc, says):
    import jam_core.ops.status

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(jam_core.ops.status, "status", fail)
    res = jam(runner, "status", code=1)
    assert says in one_line(res)


def test_a_garbage_catalog_is_one_line(jam_bin, jam_root):
    make_file(jam_root.path / "a.bin", 100_000)
    (jam_root.jam_dir / "catalog.db").write_bytes(b"this is not sqlite " * 512)
    for args in (["status"], ["stash", "a.bin"]):
        out = subprocess.run([jam_bin, *args], cwd=jam_root.path, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "Traceback" not in out.stderr, (args, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("jam: ") and "catalog" in lines[0], (args, out.stderr)


def test_an_unexpected_error_is_one_line_with_the_way_to_see_more(runner, jam_root, monkeypatch):
    import jam_core.ops.status

    def fail(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(jam_core.ops.status, "status", fail)
    assert "internal error: KeyError: 'surprise' (run again with JAM_DEBUG=1" in one_line(jam(runner, "status", code=1))
    monkeypatch.setenv("JAM_DEBUG", "1")
    with pytest.raises(KeyError):
        runner.invoke(main, ["status"], catch_exceptions=False)


# -- plurals, and pins when there are none ---------------------------------------------------

def test_plurals_and_no_pins(runner, jam_root):
    assert jam(runner, "pin").output == "no pins\n"
    make_file(jam_root.path / "a.bin", 100_000, 1)
    res = jam(runner, "stash", "a.bin")
    assert res.output.startswith("stashed 1 file (")
    res = jam(runner, "doctor")
    assert "checked 1 stub on 1 remote: all can come back" in res.output
    make_file(jam_root.path / "b.bin", 100_000, 2)
    jam(runner, "stash", "b.bin")
    assert "checked 2 stubs on 1 remote" in jam(runner, "doctor").output
    jam(runner, "pin", "a.bin")
    assert "1 file pinned by: a.bin" in jam(runner, "status").output
    make_file(jam_root.path / "c.bin", 100_000, 3)
    jam_root.config_path.write_text(jam_root.config_path.read_text() + '\n[policy.age]\nolder_than = "30d"\n')
    assert "of 1 candidate file," in jam(runner, "stash", "--auto", "--dry-run").output

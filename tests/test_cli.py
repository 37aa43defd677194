"""The command line as a user meets it: init, remotes, stash, checkout, status, plugins, demo."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jam_core.cli import main
from jam_core.stub import HEADER_MAX, MAGIC, XATTR, StubRecord
from tests.conftest import make_file


def jam(runner, *args, ok=True):
    res = runner.invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, (res.output, res.stderr)
    return res


def assert_one_clean_line(res):
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("jam: ")


# -- init -------------------------------------------------------------------------------------

def test_init_creates_root_with_embedded_default_remote(runner, tmp_path, isolated_home):
    tree = tmp_path / "tree"
    tree.mkdir()
    res = jam(runner, "init", str(tree))
    assert "Initialised" in res.output
    assert (tree / ".jam" / "config.toml").is_file()
    default = isolated_home / ".local/share/jam/remotes/default"
    assert (default / "objects").is_dir()
    os.chdir(tree)
    remotes = json.loads(jam(runner, "remote", "list", "--json").output)
    assert [(r["name"], r["kind"], r["location"], r["tier"]) for r in remotes] == [
        ("default", "dir", str(default), 0)
    ]
    roots = (isolated_home / ".local/share/jam/roots").read_text().splitlines()
    assert roots == [str(tree)]
    # again: a no-op that says so
    assert "already a jam root" in jam(runner, "init", str(tree)).output
    assert (isolated_home / ".local/share/jam/roots").read_text().splitlines() == [str(tree)]


def test_init_refuses_nested_root(runner, jam_root):
    (jam_root.path / "sub").mkdir()
    assert_one_clean_line(jam(runner, "init", "sub", ok=False))


def test_init_refuses_filesystem_without_user_xattrs(tmp_path, monkeypatch):
    import errno

    from jam_core.errors import UsageError
    from jam_core.root import Root

    def no_xattrs(*a, **k):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    import jam_core.root

    monkeypatch.setattr(jam_core.root, "setxattr", no_xattrs)  # jam's one door to xattrs (jam_core.fs)
    with pytest.raises(UsageError, match="extended attributes"):
        Root.init(tmp_path)
    assert not (tmp_path / ".jam").exists()


def test_commands_outside_a_root_are_refused(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["status"], ["stash", "x"], ["checkout", "x"], ["remote", "list"], ["doctor"]):
        res = jam(runner, *args, ok=False)
        assert res.exit_code == 2
        assert_one_clean_line(res)
        assert "not inside a jam root" in res.stderr


# -- remotes ----------------------------------------------------------------------------------

def test_remote_add_list_remove(runner, jam_root, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    res = jam(runner, "remote", "add", "usb", f"file://{disk}", "--tier", "1")
    assert "usb" in res.output and str(disk) in res.output
    assert (disk / "objects").is_dir()
    listing = jam(runner, "remote", "list").output
    assert listing.index("default") < listing.index("usb")
    jam(runner, "remote", "remove", "usb")
    assert "usb" not in jam(runner, "remote", "list").output
    assert disk.is_dir()  # forgetting a remote never deletes its data


@pytest.mark.parametrize("url, message", [
    ("s3://bucket/x", "no installed plugin handles s3://"),
    ("file://otherhost/x", "use file:///path"),
])
def test_remote_add_refuses_unknown_or_bad_urls(runner, jam_root, url, message):
    res = jam(runner, "remote", "add", "x", url, ok=False)
    assert_one_clean_line(res)
    assert message in res.stderr
    assert "x" not in [r.name for r in jam_root.remotes()]


def test_remote_add_missing_directory_is_not_created(runner, jam_root, tmp_path):
    gone = tmp_path / "unplugged"
    res = jam(runner, "remote", "add", "usb", str(gone), ok=False)
    assert_one_clean_line(res)
    assert "missing" in res.stderr
    assert not gone.exists()


def test_remote_add_rejects_duplicates_and_bad_names(runner, jam_root, tmp_path):
    assert_one_clean_line(jam(runner, "remote", "add", "default", str(tmp_path), ok=False))
    assert_one_clean_line(jam(runner, "remote", "add", "../evil", str(tmp_path), ok=False))
    assert_one_clean_line(jam(runner, "remote", "add", "neg", str(tmp_path), "--tier", "-1", ok=False))


def test_remote_remove_refused_while_it_holds_the_only_copy(runner, jam_root):
    make_file(jam_root.path / "big.bin", 200_000)
    jam(runner, "stash", "big.bin")
    res = jam(runner, "remote", "remove", "default", ok=False)
    assert_one_clean_line(res)
    assert "only copy" in res.stderr
    assert "default" in jam(runner, "remote", "list").output


# -- stash and checkout -----------------------------------------------------------------------

def test_stash_makes_a_stub_and_checkout_restores_it(runner, jam_root):
    path = jam_root.path / "data" / "film.mkv"
    data = make_file(path, 3_000_000, seed=1)
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    os.setxattr(path, "user.tag", b"holiday")
    res = jam(runner, "stash", "data/film.mkv")
    assert "stashed 1 file" in res.output

    st = os.lstat(path)
    assert st.st_size == len(data)
    assert st.st_blocks * 512 <= 2 * HEADER_MAX  # the header, and a block for the extra xattr
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    assert stat.S_IMODE(st.st_mode) == 0o440  # read-only stub
    rec = StubRecord.unpack(os.getxattr(path, XATTR))
    assert (rec.size, rec.mode) == (len(data), 0o640)
    assert len(os.getxattr(path, XATTR)) <= 64  # stays in the inode
    head = path.read_bytes()[:HEADER_MAX]
    assert head.startswith(MAGIC) and b"jam checkout" in head
    assert StubRecord.from_header(head).oid == rec.oid

    res = jam(runner, "checkout", "data")
    assert "checked out 1 file" in res.output
    assert path.read_bytes() == data
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    assert os.getxattr(path, "user.tag") == b"holiday"
    with pytest.raises(OSError):
        os.getxattr(path, XATTR)


def test_stash_directory_recurses_and_skips_small_files_with_reason(runner, jam_root):
    big = make_file(jam_root.path / "d" / "sub" / "big.bin", 100_000, 2)
    small = make_file(jam_root.path / "d" / "small.txt", 1000, 3)
    res = jam(runner, "stash", "d")
    assert "stashed 1 file" in res.output
    assert "small.txt" in res.stderr and "min_size" in res.stderr
    assert (jam_root.path / "d/small.txt").read_bytes() == small
    # named explicitly, a small file is stashed anyway
    jam(runner, "stash", "d/small.txt")
    assert os.getxattr(jam_root.path / "d/small.txt", XATTR)
    jam(runner, "checkout", ".")
    assert (jam_root.path / "d/small.txt").read_bytes() == small
    assert (jam_root.path / "d/sub/big.bin").read_bytes() == big


def test_stash_twice_is_a_noop_and_paths_are_relative_to_cwd(runner, jam_root, monkeypatch):
    data = make_file(jam_root.path / "a" / "b" / "f.bin", 80_000)
    monkeypatch.chdir(jam_root.path / "a")
    jam(runner, "stash", "b/f.bin")
    res = jam(runner, "stash", "b/f.bin")
    assert "stashed 0 files" in res.output and "1 already done" in res.output
    monkeypatch.chdir(jam_root.path / "a" / "b")
    jam(runner, "checkout", "f.bin")
    assert (jam_root.path / "a/b/f.bin").read_bytes() == data


def test_stash_refuses_paths_outside_the_root(runner, jam_root, tmp_path):
    outside = tmp_path / "outside.bin"
    make_file(outside, 100_000)
    res = jam(runner, "stash", str(outside), ok=False)
    assert res.exit_code == 2
    assert_one_clean_line(res)
    assert "not inside a jam root" in res.stderr
    inside = make_file(jam_root.path / "in.bin", 100_000)
    res = jam(runner, "stash", "in.bin", str(outside), ok=False)
    assert_one_clean_line(res)
    assert "outside the jam root" in res.stderr
    assert not os.listxattr(outside)
    assert (jam_root.path / "in.bin").read_bytes() == inside


def test_stash_missing_file_is_reported(runner, jam_root):
    res = jam(runner, "stash", "nope.bin", ok=False)
    assert res.exit_code == 2  # a usage error since issue 8 (was 1, "partly done")
    assert "nope.bin" in res.stderr and "no such file" in res.stderr


def test_stash_refuses_jam_own_directory(runner, jam_root):
    res = jam(runner, "stash", ".jam/config.toml", ok=False)
    assert_one_clean_line(res)


def test_equal_files_are_stored_once(runner, jam_root):
    data = make_file(jam_root.path / "one.bin", 100_000, 9)
    (jam_root.path / "two.bin").write_bytes(data)
    jam(runner, "stash", ".")
    objects = [p for p in (Path(jam_root.remotes()[0].location) / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1
    jam(runner, "checkout", ".")
    assert (jam_root.path / "two.bin").read_bytes() == data


# -- status -----------------------------------------------------------------------------------

def test_status_counts_per_directory_and_total(runner, jam_root):
    make_file(jam_root.path / "x" / "a.bin", 100_000, 1)
    make_file(jam_root.path / "x" / "b.bin", 200_000, 2)
    make_file(jam_root.path / "y" / "c.bin", 300_000, 3)
    jam(runner, "stash", "x/b.bin", "y")
    st = json.loads(jam(runner, "status", "--json").output)
    total = st["total"]
    assert (total["local"], total["stubs"], total["bytes"]) == (1, 2, 600_000)
    assert total["disk_bytes"] < 100_000 + 3 * HEADER_MAX + 8192
    dirs = {d["path"]: d for d in st["directories"]}
    assert (dirs["x"]["local"], dirs["x"]["stubs"]) == (1, 1)
    assert (dirs["y"]["local"], dirs["y"]["stubs"]) == (0, 1)
    human = jam(runner, "status").output
    assert "total" in human and "on remotes" in human
    sub = json.loads(jam(runner, "status", "y", "--json").output)
    assert sub["total"]["files"] == 1


# -- plugins ----------------------------------------------------------------------------------

def test_plugins_lists_builtins_with_hooks(runner, jam_root):
    info = json.loads(jam(runner, "plugins", "--json").output)
    by_name = {p["name"]: p for p in info}
    assert {"stash", "fetch", "has", "parse_url", "check_remote"} <= set(by_name["jam_dir"]["hooks"])
    assert by_name["jam_core.placement"]["hooks"] == ["place"]
    assert "jam_dir" in jam(runner, "plugins").output


def test_third_party_plugin_loads_from_entry_point_and_can_be_blocked(jam_bin, tmp_path, jam_root):
    site = tmp_path / "site"
    (site / "jam_hello").mkdir(parents=True)
    (site / "jam_hello" / "__init__.py").write_text(
        "from jam_core import hookimpl\n\n@hookimpl\ndef select(records, purpose):\n    return None\n"
    )
    dist = site / "jam_hello-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jam-hello\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[jam]\nhello = jam_hello\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([jam_bin, "plugins", "--json"], env=env, capture_output=True, text=True, check=True)
    hello = [p for p in json.loads(out.stdout) if p["name"] == "hello"]
    assert hello and hello[0]["hooks"] == ["select"] and hello[0]["version"] == "1.2.3"
    env["JAM_BLOCK_PLUGINS"] = "hello"
    out = subprocess.run([jam_bin, "plugins", "--json"], env=env, capture_output=True, text=True, check=True)
    assert "hello" not in [p["name"] for p in json.loads(out.stdout)]


def test_misspelled_hook_in_a_plugin_is_caught():
    import pluggy

    from jam_core import hookimpl
    from jam_core.manager import make_plugin_manager

    class Typo:
        @hookimpl
        def stahs(self, remote):
            return None

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(extra=(Typo(),), load_entrypoints=False)


def test_place_hook_first_answer_wins(jam_root, tmp_path):
    """A plugin's place answer overrides the core's default (nearest tier)."""
    from jam_core import hookimpl
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.ops.stash import stash

    far = tmp_path / "far"
    far.mkdir()
    pm = make_plugin_manager(load_entrypoints=False)
    add_remote(jam_root, pm, "far", str(far), tier=5)

    class Farthest:
        @hookimpl
        def place(self, remotes):
            return [max(remotes, key=lambda r: r.tier)]

    make_file(jam_root.path / "f.bin", 100_000)
    pm = make_plugin_manager(extra=(Farthest(),), load_entrypoints=False)
    assert stash(jam_root, ["f.bin"], pm).exit_code == 0
    assert [p for p in (far / "objects").rglob("*") if p.is_file()]
    assert not [p for p in (Path(jam_root.remotes()[0].location) / "objects").rglob("*") if p.is_file()]


# -- start-up and demo ------------------------------------------------------------------------

def test_cli_import_stays_light():
    code = "import sys, jam_core.cli; print(' '.join(m for m in ('paramiko','textual','rich','pluggy.manager','sqlite3') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "paramiko" not in out and "textual" not in out and "rich" not in out


def test_demo_runs_and_leaves_nothing_outside_tmp_and_data_dir(jam_bin, isolated_home, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    before = sorted(p.name for p in isolated_home.iterdir())
    res = subprocess.run([jam_bin, "demo"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "byte for byte" in res.stdout
    assert "Traceback" not in res.stderr
    created = {p.relative_to(isolated_home).parts[:3] for p in isolated_home.rglob("*") if p.is_file()}
    assert all(parts[:3] == (".local", "share", "jam") for parts in created), created
    # the demo's remote is in its temporary folder: nothing lands in the real default remote
    assert sorted(p.name for p in isolated_home.iterdir()) == sorted(before)
    demo_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("jam-demo-")]
    assert len(demo_dirs) == 1

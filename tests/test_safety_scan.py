"""What a stash takes and what it leaves: symlinks (never followed out of the root, never
stashed), hard links (skipped with a reason), stubs (a no-op), small files (skipped inside a
directory, stashed when named)."""

from __future__ import annotations

import os

from tests.conftest import make_file
from tests.safety_support import b3, fingerprint, is_stub, jam, listing, make_tree, status_json


def test_symlink_to_a_file_outside_is_not_stashed_nor_followed(tmp_path):
    t = make_tree(tmp_path)
    outside = tmp_path / "outside"
    make_file(outside / "secret", 200_000, seed=1)
    before = listing(outside)
    os.symlink(outside / "secret", t.root / "link")
    os.symlink("../outside", t.root / "linkdir")

    res = jam("stash", "link", "linkdir", cwd=t.root)
    assert [line.split(": ")[1:3] for line in res.err.splitlines()] == [["skipped", "link"], ["skipped", "linkdir"]]
    assert "symlink" in res.err
    res = jam("stash", ".", cwd=t.root)  # the walk sees both links and skips them silently
    assert listing(outside) == before
    assert os.path.islink(t.root / "link") and os.path.islink(t.root / "linkdir")
    assert status_json(t.root)["total"]["files"] == 0


def test_a_path_through_a_symlinked_directory_is_refused(tmp_path):
    """`jam stash linkdir/file` with linkdir -> outside the root must not stash (or write a
    temporary file) outside the root. Caught a real bug: only the last component was checked."""
    t = make_tree(tmp_path)
    outside = tmp_path / "outside"
    data = make_file(outside / "f", 200_000, seed=2)
    os.symlink("../outside", t.root / "linkdir")
    before = listing(outside)

    res = jam("stash", "linkdir/f", cwd=t.root)
    assert "symlink" in res.err
    assert listing(outside) == before and (outside / "f").read_bytes() == data
    assert not list(t.objects.rglob("*/*/*/*"))

    # A stub outside the root reached the same way is not fetched into either.
    sub = t.root / "sub"
    make_file(sub / "g", 200_000, seed=3)
    jam("stash", "sub/g", cwd=t.root)
    os.rename(sub, outside / "sub")
    os.symlink("../outside/sub", sub)
    before = listing(outside)
    res = jam("checkout", "sub/g", cwd=t.root)
    assert "symlink" in res.err
    assert listing(outside) == before
    res = jam("doctor", "--fix", "--deep", "sub/g", cwd=t.root, check=2)
    assert listing(outside) == before


def test_hard_links_are_skipped_with_a_reason(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "a", 200_000, seed=4)
    os.link(t.root / "a", t.root / "b")
    fp = fingerprint(t.root / "a")

    for args in (("a",), (".",)):
        res = jam("stash", *args, cwd=t.root)
        assert "hard-linked" in res.err, res.err
    assert fingerprint(t.root / "a") == fp and os.stat(t.root / "b").st_ino == fp[0]
    assert not is_stub(t.root / "a")


def test_stashing_a_stub_again_is_a_no_op(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "a", 200_000, seed=5)
    jam("stash", "a", cwd=t.root)
    fp = fingerprint(t.root / "a")
    objects = listing(t.remote)

    res = jam("stash", "a", ".", cwd=t.root)
    assert "1 already done" in res.out, res.out
    assert fingerprint(t.root / "a") == fp  # not rewritten: same inode, ctime, xattr
    assert listing(t.remote) == objects


def test_small_files_skipped_in_a_directory_but_stashed_when_named(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "d" / "small", 1000, seed=6)
    make_file(t.root / "d" / "big", 100_000, seed=7)
    h = b3(t.root / "d" / "small")

    res = jam("stash", "d", cwd=t.root)
    assert "smaller than core.min_size" in res.err
    assert is_stub(t.root / "d" / "big") and not is_stub(t.root / "d" / "small")

    jam("stash", "d/small", cwd=t.root)
    assert is_stub(t.root / "d" / "small")
    jam("checkout", "d", cwd=t.root)
    assert b3(t.root / "d" / "small") == h


def test_leftovers_of_a_killed_jam_are_cleaned_under_the_lock(jam_root, runner):
    """A kill can leave an older jam's hold-link (a `.jam-*.tmp` hard link of the original),
    content fetched aside (still marked as jam's) or a stub written aside: the next stash must
    not take the file for a hard-linked one, and jam's own leftovers must not linger. A user's
    file that merely has such a name is never touched."""
    from jam_core.cli import main
    from jam_core.fs import TMP_MARK
    from jam_core.stub import StubRecord, write_stub
    from tests.conftest import make_file

    d = jam_root.path / "d"
    data = make_file(d / "a.bin", 100_000, 1)
    make_file(d / "b.bin", 100_000, 2)
    os.link(d / "a.bin", d / ".jam-0123456789abcdef.tmp")
    half = d / ".jam-fedcba9876543210.tmp"
    half.write_bytes(b"half a fetch")
    os.setxattr(half, TMP_MARK, b"1")
    (d / ".jam-1111111111111111.tmp").write_bytes(b"a user's own file with a jam-like name")
    res = runner.invoke(main, ["stash", "d/a.bin"])
    assert res.exit_code == 0 and "stashed 1 file" in res.output, res.output + res.stderr
    assert sorted(os.listdir(d)) == [".jam-1111111111111111.tmp", "a.bin", "b.bin"]
    with open(d / ".jam-aaaaaaaaaaaaaaaa.tmp", "wb") as f:
        write_stub(f.fileno(), StubRecord("b3:" + "ab" * 32, 5000, 0o644, 0), "a.bin", 0)
    res = runner.invoke(main, ["checkout", "d"])
    assert res.exit_code == 0, res.output + res.stderr
    assert sorted(os.listdir(d)) == [".jam-1111111111111111.tmp", "a.bin", "b.bin"]
    assert (d / ".jam-1111111111111111.tmp").read_bytes() == b"a user's own file with a jam-like name"
    assert (jam_root.path / "d" / "a.bin").read_bytes() == data


def test_a_remote_an_older_jam_let_inside_the_root_is_never_scanned(tmp_path):
    """Before identity markers, `jam remote add usb "$DRIVE"` with $DRIVE unset put a remote
    inside the root: its objects must never become stubs of themselves."""
    import tomllib

    import tomli_w

    from tests.safety_support import is_stub, jam, make_tree

    t = make_tree(tmp_path)
    inside = t.root / "store"
    (inside / "objects" / "b3" / "ab").mkdir(parents=True)
    obj = inside / "objects" / "b3" / "ab" / ("ab" * 32)
    obj.write_bytes(os.urandom(200_000))
    cfg_path = t.root / ".jam" / "config.toml"
    cfg = tomllib.loads(cfg_path.read_text())
    cfg["remote"]["legacy"] = {"kind": "dir", "url": str(inside), "location": str(inside), "tier": 5}
    cfg_path.write_text(tomli_w.dumps(cfg))
    (t.root / "mine.bin").write_bytes(os.urandom(200_000))
    res = jam("stash", ".", cwd=t.root)
    assert is_stub(t.root / "mine.bin")
    assert not is_stub(obj) and "store" not in res.out + res.err
    status = jam("status", "--json", cwd=t.root).out
    assert "store" not in status

"""Attacker review R13: the core stash / checkout / status on hostile file kinds and races.

Each test works on real files (real xattrs, real mounts, real `jam` processes); a race is
injected at its exact instant by wrapping the function that runs then. A test marked
``xfail(strict=True, reason="BUG: ...")`` proves a hole (the fix is in the review's report);
the others name the guard they were mutation-checked against.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

import jam_core.ops.checkout as checkout_mod
import jam_core.ops.stash as stash_mod
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, jam, make_tree, record, status_json


def _stash(t, rels):
    with Session() as s:
        return stash_mod.stash(Root(t.root), rels, make_plugin_manager(), s)


def _checkout(t, rels):
    with Session() as s:
        return checkout_mod.checkout(Root(t.root), rels, make_plugin_manager(), s)


def _tmp_names(top: Path) -> list[str]:
    return [str(p) for p in top.rglob(".jam-*")]


def _mount_or_skip(args: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    res = subprocess.run(["mount", *args], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount here: {res.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def other_disk(tmp_path):
    """A real ext4 filesystem (a loop-mounted image) to mount inside a root: returns a function
    mounting it at a path; unmounted at the end."""
    mounted: list[Path] = []

    def mount_at(where: Path) -> None:
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
        where.mkdir(parents=True, exist_ok=True)
        _mount_or_skip(["-o", "loop", str(img), str(where)])
        mounted.append(where)

    yield mount_at
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# -- a user's change in the last instant --------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="BUG: a chmod between _swap's stat and its exchange is not seen: the stub "
                   "records the old mode and checkout makes a file chmod'ed 600 world-readable again")
def test_a_chmod_600_in_the_last_instant_before_the_swap_is_never_undone(tmp_path, monkeypatch):
    """The user makes a file private (chmod 600) just as jam exchanges it for its stub: the
    lease does not break on a chmod and the check after the exchange compares inode, size
    and mtime only. The stub records 0644 and a checkout brings the file back world-readable."""
    t = make_tree(tmp_path)
    f = t.root / "diary.txt"
    make_file(f, 200_000, seed=1)
    os.chmod(f, 0o644)
    real = stash_mod.exchange
    done = []

    def chmod_then_exchange(dir_fd, a, b):
        if b == "diary.txt" and not done:
            done.append(1)
            os.chmod(b, 0o600, dir_fd=dir_fd)  # the user, at this very instant
        return real(dir_fd, a, b)

    monkeypatch.setattr(stash_mod, "exchange", chmod_then_exchange)
    _stash(t, ["diary.txt"])
    monkeypatch.undo()
    assert done
    if is_stub(f):
        assert _checkout(t, ["diary.txt"]).done
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, oct(os.stat(f).st_mode)


# -- another filesystem mounted inside the root ---------------------------------------------------

def _devs_synced(module, monkeypatch) -> tuple[list[int], list[tuple[int, bool]]]:
    """Wrap ``module``'s syncfs and exchange: the devices synced, and for each exchange its
    directory's device and whether that device had been synced before it."""
    synced: list[int] = []
    swaps: list[tuple[int, bool]] = []
    real_sync, real_ex = module.syncfs, module.exchange

    def rec_sync(fd):
        synced.append(os.fstat(fd).st_dev if isinstance(fd, int) else os.stat(fd).st_dev)
        return real_sync(fd)

    def rec_ex(dir_fd, a, b):
        dev = os.fstat(dir_fd).st_dev
        swaps.append((dev, dev in synced))
        return real_ex(dir_fd, a, b)

    monkeypatch.setattr(module, "syncfs", rec_sync)
    monkeypatch.setattr(module, "exchange", rec_ex)
    return synced, swaps


@pytest.mark.xfail(strict=True, reason="BUG: stash syncs only the root's filesystem (syncfs(root_fd)): a stub "
                   "written aside on another disk mounted inside the root is swapped in before it is durable")
def test_a_stub_on_another_disk_inside_the_root_is_durable_before_its_swap(tmp_path, monkeypatch, other_disk):
    """A second disk mounted at ROOT/photos (a real loop-mounted ext4): the stub written aside
    there is not made durable by a syncfs of the root's filesystem, yet the original is
    exchanged out and unlinked; a crash then can leave a stub whose header block never reached
    the disk (a file of zeros where the original was)."""
    t = make_tree(tmp_path)
    other_disk(t.root / "photos")
    sub_dev = os.stat(t.root / "photos").st_dev
    assert sub_dev != os.stat(t.root).st_dev
    make_file(t.root / "photos" / "a.raw", 300_000, seed=2)
    _synced, swaps = _devs_synced(stash_mod, monkeypatch)
    res = _stash(t, ["photos"])
    monkeypatch.undo()
    assert [r for r, _ in res.done] == ["photos/a.raw"], res
    assert [s for s in swaps if s[0] == sub_dev], "no swap on the other disk"
    assert all(ok for dev, ok in swaps if dev == sub_dev), "swapped before the other disk was synced"


@pytest.mark.xfail(strict=True, reason="BUG: checkout syncs only the root's filesystem: content fetched onto "
                   "another disk mounted inside the root replaces its stub before it is durable")
def test_content_fetched_onto_another_disk_inside_the_root_is_durable_before_its_swap(tmp_path, monkeypatch,
                                                                                       other_disk):
    """As above for checkout: the fetched content on the mounted disk is exchanged with its stub
    and the stub unlinked without a sync of that disk; a crash can leave a writable file of
    zeros (no longer a stub) that the next stash would store as the user's content."""
    t = make_tree(tmp_path)
    other_disk(t.root / "photos")
    sub_dev = os.stat(t.root / "photos").st_dev
    make_file(t.root / "photos" / "a.raw", 300_000, seed=3)
    want = b3(t.root / "photos" / "a.raw")
    assert _stash(t, ["photos"]).done
    _synced, swaps = _devs_synced(checkout_mod, monkeypatch)
    res = _checkout(t, ["photos"])
    monkeypatch.undo()
    assert res.done and b3(t.root / "photos" / "a.raw") == want
    assert [s for s in swaps if s[0] == sub_dev], "no swap on the other disk"
    assert all(ok for dev, ok in swaps if dev == sub_dev), "swapped before the other disk was synced"


# -- status: a wrong answer a user would trust -----------------------------------------------------

@pytest.mark.xfail(strict=True, reason="BUG: jam status adds st_blocks of every name: a hard-linked file's "
                   "blocks are counted once per link in 'on this disk' (du and the budget count them once)")
def test_status_counts_a_hard_linked_files_blocks_once_on_this_disk(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "a" / "movie.mkv", 4 << 20, seed=4)
    (t.root / "b").mkdir()
    os.link(t.root / "a" / "movie.mkv", t.root / "b" / "movie.mkv")
    blocks = os.stat(t.root / "a" / "movie.mkv").st_blocks * 512
    total = status_json(t.root)["total"]
    du = int(subprocess.run(["du", "-s", "-B1", "--exclude=.jam", str(t.root)], capture_output=True,
                            text=True, check=True).stdout.split()[0])
    assert total["disk_bytes"] < 2 * blocks, (total, blocks, du)

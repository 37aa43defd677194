"""Issue 13: a file stashed to a dir remote on its own filesystem becomes the object itself (a hard
link, as git-annex moves a file into its store), never a copy; and no writer, hard link or kill
can make that object share its inode with a file that can still change.

The faults land at the exact instant: between the backend's link and the swap (a ``sync`` hook
of the test's, which the core calls there), inside the swap's last check, or a SIGKILL of a real
process at those points.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jam_core import hookimpl
from tests.conftest import make_file
from tests.safety_support import b3, is_stub, jam, make_tree, objects_verify, record, status_json

SIZE = 300_000


def _object(t, path: Path) -> Path:
    digest = record(path).oid.split(":")[1]
    return t.objects / "b3" / digest[:2] / digest


def _stash(t, rels, plugin=None):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    pm = make_plugin_manager()
    if plugin is not None:
        pm.register(plugin, name="test-fault")
    with Session() as s:
        return stash(Root(t.root), rels, pm, s)


def _one_file(tmp_path, seed: int):
    """A tree with one file ``a`` of SIZE bytes: (tree, its path, its b3sum)."""
    t = make_tree(tmp_path)
    path = t.root / "a"
    make_file(path, SIZE, seed=seed)
    return t, path, b3(path)


def _objects(t) -> list[Path]:
    return [p for p in (t.objects / "b3").rglob("*") if p.is_file()] if (t.objects / "b3").exists() else []


def test_a_file_stashed_to_a_remote_on_its_own_disk_becomes_the_object_itself(tmp_path):
    t = make_tree(tmp_path)
    path = t.root / "a"
    make_file(path, SIZE, seed=1)
    os.chmod(path, 0o640)
    before, digest = os.stat(path), b3(path)

    jam("stash", "a", cwd=t.root)

    assert is_stub(path)
    obj = os.stat(_object(t, path))
    assert (obj.st_ino, obj.st_dev) == (before.st_ino, before.st_dev), "copied, not adopted"
    assert obj.st_nlink == 1 and obj.st_mode & 0o7777 == 0o444, "the object is not sealed"
    assert not list((t.remote / "tmp").iterdir()), "the command's list of adoptions was left behind"
    jam("doctor", cwd=t.root)
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest and os.stat(path).st_mode & 0o7777 == 0o640
    assert os.stat(path).st_ino != before.st_ino, "checkout must copy: the object stays on the remote"
    objects_verify(t.remote)


def test_an_adopted_object_holds_content_only_and_the_stub_brings_the_xattrs_back(tmp_path):
    """The file's own xattrs (a download's origin URL) go with its stub, not with the object on
    the remote: the object has none, as a copy would, and checkout brings them back."""
    t, path, digest = _one_file(tmp_path, seed=9)
    os.setxattr(path, "user.xdg.origin.url", b"https://example.org/a")
    before = os.stat(path)

    jam("stash", "a", cwd=t.root)

    obj = _object(t, path)
    assert os.stat(obj).st_ino == before.st_ino, "copied, not adopted"
    assert not [n for n in os.listxattr(obj) if n.startswith("user.")], os.listxattr(obj)
    assert os.stat(obj).st_mode & 0o7777 == 0o444
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest and os.getxattr(path, "user.xdg.origin.url") == b"https://example.org/a"


class _AtSync:
    """Runs ``fn`` once, when the core asks the remotes to sync: after the backend stored the
    batch, before the files it adopts are linked (and swapped)."""

    def __init__(self, fn):
        self.fn, self.done = fn, False

    @hookimpl
    def sync(self, remote, session):
        if not self.done:
            self.done = True
            self.fn()
        return None  # the dir backend's own sync runs too


def _before_swap(monkeypatch, fn) -> None:
    """Runs ``fn`` once, just before the first swap: the batch's adopted files are linked (their
    objects in place and durable), none is swapped yet."""
    import jam_core.ops.stash as stash_mod

    real, done = stash_mod._swap, []

    def swap(s, leases):
        if not done:
            done.append(1)
            fn()
        return real(s, leases)

    monkeypatch.setattr(stash_mod, "_swap", swap)


def test_a_writer_that_opens_the_file_before_the_link_keeps_it_local_and_untouched_by_jam(tmp_path):
    t = make_tree(tmp_path)
    path = t.root / "a"
    make_file(path, SIZE, seed=14)
    st = os.stat(path)

    def writer():
        subprocess.run([sys.executable, "-c", f"f = open({str(path)!r}, 'r+b'); f.write(b'EVIL'); f.close()"],
                       check=True, timeout=60)

    res = _stash(t, ["a"], _AtSync(writer))

    assert res.done == [] and not is_stub(path) and path.read_bytes()[:4] == b"EVIL", res
    assert os.stat(path).st_nlink == 1 and os.stat(path).st_ino == st.st_ino
    assert _objects(t) == [], "an object was stored for a file that changed before its link"


def test_a_writer_that_opens_the_file_between_the_link_and_the_swap_never_writes_into_the_object(tmp_path,
                                                                                                  monkeypatch):
    t, path, digest = _one_file(tmp_path, seed=2)
    ino = os.stat(path).st_ino

    def writer():  # a real process: its open(O_RDWR) waits for the lease, then it writes
        subprocess.run([sys.executable, "-c", f"f = open({str(path)!r}, 'r+b'); f.write(b'EVIL'); f.close()"],
                       check=True, timeout=60)
        # the writer is done, the stash not yet: the object stored is still what it is named for
        objects_verify(t.remote)
        assert _objects(t), "nothing was stored"

    _before_swap(monkeypatch, writer)
    res = _stash(t, ["a"])

    assert res.done == [] and not is_stub(path), res
    assert path.read_bytes()[:4] == b"EVIL" and os.stat(path).st_ino == ino
    for obj in _objects(t):  # what the remote holds is still the content it is named for
        assert os.stat(obj).st_ino != ino, "the object is the file a writer changed"
    objects_verify(t.remote)
    assert [b3(p) for p in _objects(t)] == [digest]


@pytest.mark.parametrize("when", ["before the link", "after the link"])
def test_a_hard_link_made_before_the_swap_keeps_the_file_local(tmp_path, monkeypatch, when):
    t = make_tree(tmp_path)
    path, other = t.root / "a", tmp_path / "other"
    make_file(path, SIZE, seed=3)

    if when == "after the link":
        _before_swap(monkeypatch, lambda: os.link(path, other))
        res = _stash(t, ["a"])
    else:
        res = _stash(t, ["a"], _AtSync(lambda: os.link(path, other)))

    assert res.done == [] and not is_stub(path), "stashed a file that had gained another name"
    with open(other, "r+b") as f:
        f.write(b"EVIL")
    objects_verify(t.remote)


def test_a_hard_link_made_in_the_swap_s_last_instant_never_shares_the_object(tmp_path, monkeypatch):
    """The link lands after the swap's checks, before the original's temporary name goes: the file
    is a stub, and its object must be an inode of its own (a writer through the new name cannot
    reach it)."""
    import jam_core.ops.stash as stash_mod

    t = make_tree(tmp_path)
    path, other = t.root / "a", tmp_path / "other"
    make_file(path, SIZE, seed=4)
    digest = b3(path)
    real = stash_mod._xattrs_now

    def late_link(fd):
        got = real(fd)
        if not other.exists():  # linkat(AT_SYMLINK_FOLLOW) needs a directory descriptor in Python
            d = os.open(other.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{fd}", other.name, dst_dir_fd=d, follow_symlinks=True)
            finally:
                os.close(d)
        return got

    monkeypatch.setattr(stash_mod, "_xattrs_now", late_link)
    res = _stash(t, ["a"])

    assert [r for r, _ in res.done] == ["a"] and is_stub(path), res
    with open(other, "r+b") as f:
        f.write(b"EVIL")
    objects_verify(t.remote)
    assert b3(_object(t, path)) == digest
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest


def _killed_stash(t, when: str) -> None:
    """A real process stashes ``a`` and is SIGKILLed ``when``: "linked" (the object is the file,
    nothing swapped) or "swapped" (the stub in place, the object not sealed yet)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        import jam_core.ops.stash as stash_mod
        from jam_core.fs import Leases
        from jam_core.manager import make_plugin_manager
        from jam_core.model import Session
        from jam_core.ops.stash import stash
        from jam_core.root import Root

        pm = make_plugin_manager()
        if {when!r} == "linked":  # the first swap's start: the link made and durable
            stash_mod._swap = lambda s, leases: os.kill(os.getpid(), signal.SIGKILL)
        else:
            real = Leases.release
            def release(self, fd, kept=False):
                if kept:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(self, fd, kept)
            Leases.release = release
        with Session() as s:
            from pathlib import Path
            stash(Root(Path({str(t.root)!r})), ["a"], pm, s)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()


def test_a_stash_killed_after_the_link_is_undone_and_finished_by_the_next(tmp_path):
    t, path, digest = _one_file(tmp_path, seed=5)

    _killed_stash(t, "linked")

    assert not is_stub(path) and os.stat(path).st_nlink == 2  # the file, and the object it became
    assert status_json(t.root)["problems"] == []
    jam("stash", "a", cwd=t.root)  # the next stash undoes the link, then stashes it
    assert is_stub(path)
    obj = os.stat(_object(t, path))
    assert obj.st_nlink == 1 and obj.st_mode & 0o222 == 0
    assert not [p for p in (t.remote / "tmp").iterdir() if p.name.endswith(".adopt")]
    jam("doctor", cwd=t.root)
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest
    objects_verify(t.remote)


def test_a_file_changed_after_a_killed_link_never_leaves_its_bytes_under_the_old_name(tmp_path):
    t, path, old = _one_file(tmp_path, seed=6)

    _killed_stash(t, "linked")
    with open(path, "r+b") as f:  # edited in place: the same inode the object still is
        f.write(b"NEW!")
    new = b3(path)

    jam("stash", "a", cwd=t.root)
    assert is_stub(path)
    objects_verify(t.remote)  # the old name no longer holds bytes that are not its content
    old_obj = t.objects / "b3" / old[:2] / old
    assert not old_obj.exists() or b3(old_obj) == old
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == new


def test_a_stash_killed_after_the_swap_leaves_a_stub_whose_object_is_sealed_by_the_next_stash(tmp_path):
    t, path, digest = _one_file(tmp_path, seed=7)
    os.setxattr(path, "user.tag", b"kept by the stub")

    _killed_stash(t, "swapped")

    assert is_stub(path)
    jam("stash", "a", cwd=t.root)  # nothing to stash: it still settles what the killed one left
    obj = os.stat(_object(t, path))
    assert obj.st_nlink == 1 and obj.st_mode & 0o222 == 0, "the killed stash's object is still writable"
    assert "user.tag" not in os.listxattr(_object(t, path)), "the sealed object kept the file's xattrs"
    assert not list((t.remote / "tmp").iterdir()), "the killed stash's list (or an upload) was left"
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest and os.getxattr(path, "user.tag") == b"kept by the stub"


def test_two_remotes_on_one_disk_hold_two_copies_not_one_inode(tmp_path):
    """copies = 2 on two dir remotes of the same disk: one may adopt the file, the other copies
    it; damaging one object leaves the other to check out from."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    t = make_tree(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    add_remote(Root(t.root), make_plugin_manager(), "spare", str(second))
    with open(t.root / ".jam" / "config.toml", "a") as f:
        f.write("\n[place]\ncopies = 2\n")
    path = t.root / "a"
    make_file(path, SIZE, seed=9)
    digest = b3(path)

    jam("stash", "a", cwd=t.root)

    assert is_stub(path)
    objs = [_object(t, path), second / "objects" / _object(t, path).relative_to(t.objects)]
    assert all(p.exists() for p in objs)
    inos = {os.stat(p).st_ino for p in objs}
    assert len(inos) == 2, "both remotes hold one inode: one copy, counted twice"
    os.chmod(objs[0], 0o644)
    with open(objs[0], "r+b") as f:
        f.write(b"ROT!")
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest


def test_equal_files_in_one_stash_share_one_sealed_object(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "a", SIZE, seed=10)
    (t.root / "b").write_bytes((t.root / "a").read_bytes())
    digest = b3(t.root / "a")

    res = _stash(t, ["a", "b"])

    assert sorted(r for r, _ in res.done) == ["a", "b"], res
    obj = os.stat(_object(t, t.root / "a"))
    assert obj.st_nlink == 1 and obj.st_mode & 0o222 == 0
    jam("checkout", "a", "b", cwd=t.root)
    assert b3(t.root / "a") == b3(t.root / "b") == digest


def test_an_equal_file_keeps_its_object_when_a_writer_comes_for_the_other(tmp_path, monkeypatch):
    """``a`` and ``b`` are equal and stored once; a writer opens ``a`` before its swap. ``a``
    stays local with the writer's bytes, and ``b`` (a stub) still checks out."""
    t = make_tree(tmp_path)
    a, b = t.root / "a", t.root / "b"
    make_file(a, SIZE, seed=11)
    b.write_bytes(a.read_bytes())
    digest = b3(a)

    def writer():
        subprocess.run([sys.executable, "-c", f"f = open({str(a)!r}, 'r+b'); f.write(b'EVIL'); f.close()"],
                       check=True, timeout=60)

    _before_swap(monkeypatch, writer)
    res = _stash(t, ["a", "b"])

    assert [r for r, _ in res.done] == ["b"] and not is_stub(a), res
    assert a.read_bytes()[:4] == b"EVIL"
    objects_verify(t.remote)
    jam("checkout", "b", cwd=t.root)
    assert b3(b) == digest


def test_equal_files_never_share_an_object_that_is_still_one_of_them(tmp_path, monkeypatch):
    """``a`` and ``b`` are equal and stored once; a writer opens ``a`` before its swap while the
    remote's disk is full (no copy can be made any more). ``b``, a stub, must still check out:
    its object was never ``a``'s own inode."""
    import errno

    import jam_dir

    t = make_tree(tmp_path)
    a, b = t.root / "a", t.root / "b"
    make_file(a, SIZE, seed=12)
    b.write_bytes(a.read_bytes())
    digest = b3(a)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writer():
        monkeypatch.setattr(jam_dir, "_copy_hashing", full)  # from now on the remote takes no copy
        subprocess.run([sys.executable, "-c", f"f = open({str(a)!r}, 'r+b'); f.write(b'EVIL'); f.close()"],
                       check=True, timeout=60)

    _before_swap(monkeypatch, writer)
    res = _stash(t, ["a", "b"])
    monkeypatch.undo()

    assert not is_stub(a) and a.read_bytes()[:4] == b"EVIL", res
    if is_stub(b):
        jam("checkout", "b", cwd=t.root)
    assert b3(b) == digest


def test_an_equal_file_of_a_later_batch_waits_for_the_adopted_one_and_both_are_stashed(tmp_path, monkeypatch):
    """One file per batch: ``a``'s batch adopts it; ``b`` (which cannot be adopted) is stored
    while ``a`` is linked but not swapped, and finds the object still ``a``'s unsettled inode. It
    waits for ``a`` to settle (never copying over an object ``a`` is about to be swapped on),
    then keeps it."""
    import threading

    import jam_dir
    from jam_core.ops import pipeline

    monkeypatch.setattr(pipeline, "BATCH_FILES", 1)
    t = make_tree(tmp_path)
    a, b = t.root / "a", t.root / "b"
    make_file(a, SIZE, seed=13)
    b.write_bytes(a.read_bytes())
    digest, ino, b_ino = b3(a), os.stat(a).st_ino, os.stat(b).st_ino
    a_linked, b_saw_it = threading.Event(), threading.Event()

    real_may = jam_dir._may_adopt  # b cannot be adopted (as if it were another user's): b is copied
    monkeypatch.setattr(jam_dir, "_may_adopt", lambda remote, base, st, session: st.st_ino != b_ino
                        and real_may(remote, base, st, session))
    real_open = jam_dir._open_object

    def open_object(base, oid):  # b's store, in the worker: it has seen a's object
        got = real_open(base, oid)
        if a_linked.is_set() and threading.current_thread() is not threading.main_thread():
            b_saw_it.set()
        return got

    monkeypatch.setattr(jam_dir, "_open_object", open_object)

    class Order:  # b's store begins once a is linked
        calls = 0

        @hookimpl(hookwrapper=True)
        def stash(self, remote, oid):
            Order.calls += 1
            if Order.calls == 2:
                a_linked.wait(30)
            yield

    _before_swap(monkeypatch, lambda: a_linked.set() or b_saw_it.wait(30))
    res = _stash(t, ["a", "b"], Order())

    assert b_saw_it.is_set()
    assert sorted(r for r, _ in res.done) == ["a", "b"], res
    obj = os.stat(_object(t, a))
    assert obj.st_ino == ino and obj.st_nlink == 1 and obj.st_mode & 0o222 == 0
    jam("checkout", "a", "b", cwd=t.root)
    assert b3(a) == b3(b) == digest


@pytest.mark.parametrize("failing", ["the stubs' syncfs", "the links' syncfs"])
def test_a_failed_syncfs_leaves_every_file_local_and_apart_from_the_objects(tmp_path, monkeypatch, failing):
    """A batch's syncfs fails: none is swapped, each file keeps its bytes, inode, mode, mtime and
    its one name, and no object is one of them. The files are linked into the remote only after
    the stubs' syncfs: when that one fails even their ctimes are as they were (after the links,
    only the ctime moves: a link and its undo are changes of the inode)."""
    import errno

    import jam_core.ops.stash as stash_mod

    t = make_tree(tmp_path)
    names = ("f0", "f1", "f2")
    for i, n in enumerate(names):
        make_file(t.root / n, SIZE, seed=20 + i)
    before = {n: (os.stat(t.root / n), b3(t.root / n)) for n in names}
    calls = []
    real = stash_mod.syncfs

    def failing_syncfs(fd):
        calls.append(fd)
        if len(calls) == (1 if failing == "the stubs' syncfs" else 2):
            raise OSError(errno.EIO, "I/O error")
        return real(fd)

    monkeypatch.setattr(stash_mod, "syncfs", failing_syncfs)
    res = _stash(t, list(names))
    monkeypatch.undo()

    assert not res.done and res.aborted, res
    inodes = {os.stat(p).st_ino for p in _objects(t)}
    for n, (st, digest) in before.items():
        now = os.stat(t.root / n)
        assert not is_stub(t.root / n) and b3(t.root / n) == digest
        assert (now.st_ino, now.st_mode, now.st_mtime_ns, now.st_nlink) == (st.st_ino, st.st_mode, st.st_mtime_ns, 1)
        assert now.st_ino not in inodes
        if failing == "the stubs' syncfs":
            assert now.st_ctime_ns == st.st_ctime_ns, "a stash that failed before the links touched the file"
    objects_verify(t.remote)


def test_a_stub_a_killed_stash_swapped_before_its_catalog_commit_is_recorded_by_the_next(tmp_path):
    """Killed between its swap and its catalog's commit, a stash leaves a stub the catalog does
    not know (policies and the cd hook cannot see it). Running the stash again records it, its
    object listed in this root's refs: `jam doctor` finds nothing to fix."""
    import sqlite3

    t, path, digest = _one_file(tmp_path, seed=15)
    jam("stash", "a", cwd=t.root)
    with sqlite3.connect(t.root / ".jam" / "catalog.db") as db:  # the state such a kill leaves
        db.execute("DELETE FROM stubs")
    assert "catalog-unknown" in jam("doctor", cwd=t.root, check=1).out

    jam("stash", "a", cwd=t.root)

    jam("doctor", cwd=t.root)
    rid = next(p for p in (t.remote / "meta" / "refs").iterdir() if "." not in p.name)
    assert record(path).oid.split(":")[1] in rid.read_text() or record(path).oid in rid.read_text()
    jam("checkout", "a", cwd=t.root)
    assert b3(path) == digest


def test_a_stash_recovers_nothing_on_a_location_that_is_not_its_remote(tmp_path):
    """Another remote's directory now sits at the remote's location (another drive mounted
    there). The recovery each stash starts with must not touch it: a dead jam's upload left in
    its tmp/ stays (the upload path would refuse that location anyway, by its marker)."""
    import shutil

    from jam_core.fs import _host

    t = make_tree(tmp_path)
    other = make_tree(tmp_path, "other")
    shutil.rmtree(t.remote)
    os.rename(other.remote, t.remote)
    dead = subprocess.Popen(["true"])
    dead.wait()
    part = t.remote / "tmp" / f"{_host()}.{dead.pid}.{'0' * 16}.part"
    part.write_bytes(b"")
    (t.root / "d").mkdir()

    jam("stash", "d", cwd=t.root)

    assert part.exists(), "a stash cleaned another remote's tmp/"

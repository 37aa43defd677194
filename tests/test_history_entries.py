"""Issue 15 part 3: restore, clone and sync make a snapshot's entries one way
(``store.make_entry``), not durable per file: one ``syncfs`` for the batch."""

from __future__ import annotations

import os

from jam_core.history import clone, restore, store
from jam_core.manager import make_plugin_manager
from jam_core.root import Root
from tests.safety_support import is_stub, make_tree


def test_restore_makes_entries_with_one_syncfs_and_no_fsync_per_file(tmp_path, monkeypatch):
    t = make_tree(tmp_path)
    (t.root / "d").mkdir()
    for n in range(20):
        (t.root / f"d/f{n}").write_bytes(b"x" * (n + 1))
    os.symlink("f0", t.root / "d/link")
    (t.root / "d/empty").write_bytes(b"")
    pm = make_plugin_manager()
    store.commit(Root(t.root), pm)
    for n in os.listdir(t.root / "d"):
        os.unlink(t.root / "d" / n)
    os.rmdir(t.root / "d")

    fsyncs, syncfses, entries = [], [], []
    real_fsync, real_syncfs, real_make = os.fsync, restore.syncfs, restore.make_entry
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(restore, "syncfs", lambda fd: (syncfses.append(fd), real_syncfs(fd))[1])
    monkeypatch.setattr(restore, "make_entry", lambda *a: (entries.append(a[1]), real_make(*a))[1])
    out = restore.restore(Root(t.root), "d")
    assert len(out.restored) == 22
    assert fsyncs == [], "no fsync per stub: one syncfs makes the batch durable"
    assert len(syncfses) == 1
    assert sorted(entries) == sorted(["link", "empty", *(f"f{n}" for n in range(20))])
    assert is_stub(t.root / "d/f7") and os.readlink(t.root / "d/link") == "f0"
    assert (t.root / "d/empty").read_bytes() == b""


def test_clone_and_restore_share_one_make_entry():
    assert clone.make_entry is store.make_entry and restore.make_entry is store.make_entry

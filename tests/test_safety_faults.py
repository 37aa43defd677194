"""Faults around one file: a corrupt remote object, a file modified while it is stashed, a
remote that is gone, a stub written into, a backend that fails (invariants 1, 2, 3, 5).

Injections are real: bytes flipped on disk, a directory renamed away, `chattr +i`, and test
plugins registered through ``make_plugin_manager(extra=...)`` that act at a precise point of
the data path. Tests run as root, so permission bits would not stop anything.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from jam_core import hookimpl
from jam_core.errors import IntegrityError, RemoteError
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import object_relpath
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import (
    b3,
    fingerprint,
    is_stub,
    jam,
    make_tree,
    objects_verify,
    on_another_disk,
    record,
    status_json,
)


def stashed_tree(tmp_path, n=1, size=300_000):
    t = make_tree(tmp_path)
    for i in range(n):
        make_file(t.root / f"f{i}", size, seed=100 + i)
    digests = {f"f{i}": b3(t.root / f"f{i}") for i in range(n)}
    return t, digests


def no_jam_tmp(d: Path) -> bool:
    return not [n for n in os.listdir(d) if n.startswith(".jam-")]


# -- 2. a corrupt object on the remote -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "other content"])
def test_corrupt_object_is_refused_and_the_stub_untouched(tmp_path, damage):
    t, digests = stashed_tree(tmp_path)
    jam("stash", "f0", cwd=t.root)
    rec = record(t.root / "f0")
    obj = t.objects / object_relpath(rec.oid)
    assert obj.is_file()
    os.chmod(obj, 0o644)
    if damage == "flip a byte":
        with open(obj, "r+b") as f:
            f.seek(123_456)
            b = f.read(1)
            f.seek(123_456)
            f.write(bytes([b[0] ^ 0x01]))
    elif damage == "truncate":
        os.truncate(obj, 1000)
    else:
        make_file(obj, rec.size, seed=999)
    fp = fingerprint(t.root / "f0")

    res = jam("checkout", "f0", cwd=t.root, check=1)
    assert "corrupt" in res.err and "vault" in res.err, res.err
    assert fingerprint(t.root / "f0") == fp  # same xattr, stat (ctime too), header
    assert no_jam_tmp(t.root)

    res = jam("doctor", "--deep", "--json", cwd=t.root, check=1)
    kinds = {(p["kind"], p["path"]) for p in json.loads(res.out)["problems"]}
    assert ("corrupt", "f0") in kinds or ("missing", "f0") in kinds, kinds
    assert fingerprint(t.root / "f0") == fp and no_jam_tmp(t.root)

    # put the good object back: the stub was kept, so the file comes back whole
    os.chmod(obj, 0o644)
    obj.unlink()
    make_file(t.root / "again", rec.size, seed=100)  # the same bytes as f0
    jam("stash", "again", cwd=t.root)
    jam("checkout", "f0", cwd=t.root)
    assert b3(t.root / "f0") == digests["f0"]


# -- 3. a file modified while it is being stashed ------------------------------------------------

def _rewrite_same_size_keep_mtime(path):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"NEW CONTENT")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells


def _append(path):
    with open(path, "ab") as f:
        f.write(b"appended while stashing")


def _replace(path):
    """A new inode with the same size and mtime (how editors save)."""
    st = os.stat(path)
    tmp = str(path) + ".new"
    data = bytearray(Path(path).read_bytes())
    data[:11] = b"NEW CONTENT"
    Path(tmp).write_bytes(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, path)


MODIFY = {"rewrite": _rewrite_same_size_keep_mtime, "append": _append, "replace": _replace}


class ModifyBeforeStore:
    """Modifies the source just before the backend reads it, then lets the backend answer."""

    def __init__(self, modify):
        self.modify, self.calls, self.path = modify, 0, None

    @hookimpl(tryfirst=True)
    def stash(self, source):
        self.calls += 1
        self.modify(self.path)  # by its name: ``source`` is the descriptor jam holds open
        return None


class ModifyAfterStore:
    """Modifies the source once the backend has stored (and verified) the old content."""

    def __init__(self, modify):
        self.modify, self.calls, self.path = modify, 0, None

    @hookimpl(wrapper=True)
    def stash(self, source):
        result = yield
        self.calls += 1
        self.modify(self.path)  # by its name: ``source`` is the descriptor jam holds open
        return result


class ModifyBeforeSwap:
    """Modifies the file after every check made while storing it, just before the swap (the
    remotes' ``sync``, called once the batch is stored): only the swap's own check sees it."""

    def __init__(self, modify):
        self.modify, self.calls, self.path = modify, 0, None

    @hookimpl(tryfirst=True)
    def sync(self):
        self.calls += 1
        self.modify(self.path)
        return None


@pytest.mark.parametrize("when", [ModifyBeforeStore, ModifyAfterStore, ModifyBeforeSwap])
@pytest.mark.parametrize("how", sorted(MODIFY))
def test_file_modified_while_stashed_stays_local_with_new_content(tmp_path, when, how):
    t = make_tree(tmp_path)
    make_file(t.root / "f", 300_000, seed=7)
    plugin = when(MODIFY[how])
    plugin.path = t.root / "f"
    pm = make_plugin_manager(extra=(plugin,))
    with Session() as s:
        res = stash(Root(t.root), ["f"], pm, s)
    assert plugin.calls == 1
    assert not res.done, res
    assert record(t.root / "f") is None and not is_stub(t.root / "f")
    data = (t.root / "f").read_bytes()
    assert b"NEW CONTENT" in data[:11] or data.endswith(b"appended while stashing")
    assert len(res.skipped) == 1 and res.skipped[0][0] == "f"
    assert no_jam_tmp(t.root)
    objects_verify(t.remote)
    st = status_json(t.root)["total"]
    assert (st["local"], st["stubs"]) == (1, 0)


# The last-instant write and save (between the swap's checks and its exchange) are in
# tests/test_safety_swaps.py, with the exchange they test.


# -- 4. the remote is gone ------------------------------------------------------------------------

def test_remote_gone_stash_errors_clearly_and_nothing_is_recreated(tmp_path):
    t, digests = stashed_tree(tmp_path, n=3)
    gone = tmp_path / "unplugged"
    os.rename(t.remote, gone)
    fps = {n: fingerprint(t.root / n) for n in digests}

    res = jam("stash", ".", cwd=t.root, check=1)
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jam: ") and "'vault'" in lines[0], res.err
    assert str(t.remote) in lines[0]
    assert not os.path.lexists(t.remote), "the remote's directory was re-created"
    assert {n: fingerprint(t.root / n) for n in digests} == fps
    assert no_jam_tmp(t.root)

    res = jam("doctor", cwd=t.root, check=1)
    assert "vault" in res.out and not os.path.lexists(t.remote)


def test_remote_gone_checkout_errors_clearly_and_stubs_stay(tmp_path):
    t, digests = stashed_tree(tmp_path, n=3)
    jam("stash", ".", cwd=t.root)
    gone = tmp_path / "unplugged"
    os.rename(t.remote, gone)
    fps = {n: fingerprint(t.root / n) for n in digests}

    res = jam("checkout", "f0", cwd=t.root, check=1)
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jam: ") and "'vault'" in lines[0], res.err
    res = jam("checkout", ".", cwd=t.root, check=1)
    assert res.err.strip() and all("vault" in line for line in res.err.splitlines() if "failed" in line)
    assert not os.path.lexists(t.remote), "the remote's directory was re-created"
    assert {n: fingerprint(t.root / n) for n in digests} == fps
    assert no_jam_tmp(t.root)

    os.rename(gone, t.remote)  # plugged back in: everything comes back
    jam("checkout", ".", cwd=t.root)
    assert {n: b3(t.root / n) for n in digests} == digests


# -- 5. a stub written into -----------------------------------------------------------------------

def _write_header(p):
    with open(p, "r+b") as f:
        f.write(b"MY NOTES")


def _write_in_hole_keep_mtime(p):
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.seek(200_000)
        f.write(b"x" * 10_000)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _truncate_and_write(p):
    Path(p).write_bytes(b"hello\n")


def _append_to_stub(p):
    with open(p, "ab") as f:
        f.write(b"more")


@pytest.mark.parametrize("write", [_write_header, _write_in_hole_keep_mtime, _truncate_and_write, _append_to_stub])
def test_stub_written_into_is_never_fetched_over(tmp_path, write):
    t, digests = stashed_tree(tmp_path)
    jam("stash", "f0", cwd=t.root)
    p = t.root / "f0"
    os.chmod(p, 0o644)
    write(p)
    fp = fingerprint(p)
    content = p.read_bytes()

    res = jam("checkout", "f0", cwd=t.root, check=None)
    assert "written into" in res.err, res.err
    res = jam("checkout", ".", cwd=t.root, check=None)
    assert fingerprint(p) == fp and p.read_bytes() == content
    assert no_jam_tmp(t.root)

    st = status_json(t.root)
    if write is _truncate_and_write:
        # status trusts the stat for a writable file smaller than a block (72f2f56, for speed):
        # it counts this one as local. checkout and doctor read the xattr and catch it.
        assert st["total"]["stubs"] == 0, st
    else:
        assert st["total"]["dirty"] == 1 and [x["path"] for x in st["problems"]] == ["f0"], st
    res = jam("doctor", "--json", cwd=t.root, check=1)
    assert [(x["kind"], x["path"]) for x in json.loads(res.out)["problems"]] == [("dirty", "f0")]
    res = jam("stash", "f0", cwd=t.root, check=None)
    assert "written into" in res.err
    assert fingerprint(p) == fp and p.read_bytes() == content
    objects_verify(t.remote)
    assert len(objects_verify(t.remote)) == 1  # its object is kept


def test_stub_overwritten_whole_is_never_fetched_over(tmp_path):
    """Filling a stub with new bytes (`cat other > stub`) makes an ordinary-looking file: it
    must never be fetched over. (doctor does not flag this case: the scan's stat pre-filter
    takes a writable, fully allocated file as local without reading its xattr.)"""
    t, digests = stashed_tree(tmp_path)
    jam("stash", "f0", cwd=t.root)
    p = t.root / "f0"
    os.chmod(p, 0o644)
    new = make_file(t.root / "other", 300_000, seed=55)
    with open(p, "r+b") as f:
        f.write(new)
    jam("checkout", ".", cwd=t.root, check=None)
    assert p.read_bytes() == new


# -- 9. a backend that fails never leaves a stub behind (invariant 1) -----------------------------

class Failing:
    def __init__(self, exc):
        self.exc = exc

    @hookimpl(tryfirst=True)
    def stash(self, remote, oid):
        raise self.exc


@pytest.mark.parametrize("exc", [IntegrityError("stored bytes do not match"), RemoteError("remote 'vault': refused"),
                                 OSError(errno.EIO, "I/O error")])
def test_backend_error_leaves_the_file_local(tmp_path, exc):
    t, digests = stashed_tree(tmp_path, n=2)
    fps = {n: fingerprint(t.root / n) for n in digests}
    with Session() as s:
        res = stash(Root(t.root), ["."], make_plugin_manager(extra=(Failing(exc),)), s)
    assert not res.done and res.exit_code != 0 or res.skipped, res
    assert {n: fingerprint(t.root / n) for n in digests} == fps
    assert not any(is_stub(t.root / n) for n in digests)
    assert no_jam_tmp(t.root)


@pytest.mark.parametrize("fail_at", ["copy", "rename"])
def test_dir_backend_write_failure_leaves_the_file_local(tmp_path, monkeypatch, fail_at):
    t, digests = stashed_tree(tmp_path)
    fp = fingerprint(t.root / "f0")
    remote = str(t.remote)

    on_another_disk(monkeypatch)
    if fail_at == "copy":
        def no_space(*a, **kw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "copy_file_range", no_space)
        monkeypatch.setattr(os, "sendfile", no_space)
        monkeypatch.setattr(os, "pwrite", no_space)  # the dir backend copies and hashes in one pass
    else:
        real_rename = os.rename

        def rename(src, dst, *a, **kw):
            if os.fspath(dst).startswith(remote):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_rename(src, dst, *a, **kw)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", rename)

    with Session() as s:
        res = stash(Root(t.root), ["f0"], make_plugin_manager(), s)
    monkeypatch.undo()
    assert not res.done and res.exit_code == 1
    assert "vault" in res.aborted + str(res.failed) and "space" in res.aborted + str(res.failed), res
    assert fingerprint(t.root / "f0") == fp and not is_stub(t.root / "f0")
    assert objects_verify(t.remote) == []
    assert not [p for p in (t.remote / "tmp").iterdir()], "a partial upload was left behind"


def test_immutable_remote_directory_leaves_the_file_local(tmp_path):
    """A real process against a remote whose object directory refuses writes (`chattr +i`
    stops root too): the upload completes into tmp/, the rename into place fails."""
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr is not installed")
    t, digests = stashed_tree(tmp_path)
    fan = t.objects / Path(object_relpath("b3:" + digests["f0"])).parent
    fan.mkdir(parents=True)
    if subprocess.run([chattr, "+i", str(fan)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (no CAP_LINUX_IMMUTABLE)")
    try:
        fp = fingerprint(t.root / "f0")
        res = jam("stash", "f0", cwd=t.root, check=1)
        assert "vault" in res.err and len(res.err.splitlines()) == 1, res.err
        assert fingerprint(t.root / "f0") == fp and not is_stub(t.root / "f0")
        assert list(fan.iterdir()) == []
        assert list((t.remote / "tmp").iterdir()) == []
    finally:
        subprocess.run([chattr, "-i", str(fan)], check=True)
    jam("stash", "f0", cwd=t.root)
    assert is_stub(t.root / "f0")


class WriteIntoStubDuringFetch:
    """Once the backend has written the content aside, someone writes into the stub."""

    def __init__(self, stub: Path):
        self.stub, self.calls = stub, 0

    @hookimpl(wrapper=True)
    def fetch(self):
        result = yield
        self.calls += 1
        os.chmod(self.stub, 0o644)
        with open(self.stub, "r+b") as f:
            f.write(b"MINE")
        return result


def test_stub_written_into_during_its_fetch_is_not_replaced(tmp_path):
    from jam_core.ops.checkout import checkout

    t, digests = stashed_tree(tmp_path)
    jam("stash", "f0", cwd=t.root)
    p = t.root / "f0"
    plugin = WriteIntoStubDuringFetch(p)
    with Session() as s:
        res = checkout(Root(t.root), ["f0"], make_plugin_manager(extra=(plugin,)), s)
    assert plugin.calls == 1
    assert not res.done and res.exit_code != 0, res
    assert p.read_bytes().startswith(b"MINE") and xattr_kept(p)
    assert no_jam_tmp(t.root)


def xattr_kept(p) -> bool:
    return record(p) is not None

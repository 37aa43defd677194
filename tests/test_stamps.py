"""The catalog's stamp (a stub's inode and ctime) lets status, the dry-run and doctor trust a
stub without reading it. It must only ever vouch for a stub whose bytes were found clean after
the stat it records: a stub written into (its header changed, its size and mtime put back)
must stay dirty for every later command, whatever doctor saved in between."""

from __future__ import annotations

import json
import os

from tests.safety_support import b3, is_stub, jam, make_tree


def _scribble(path) -> None:
    """Write into a stub's header block and put its mtime back: size, mtime, mode and block
    count are those of the clean stub; only its bytes and its ctime say otherwise."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"scribbled over by an app")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_blocks) == (st.st_size, st.st_mtime_ns, st.st_blocks)


def _dirty(root) -> int:
    return json.loads(jam("status", "--json", cwd=root).stdout)["total"]["dirty"]


def test_doctor_never_stamps_a_dirty_stub_so_status_and_checkout_keep_it(tmp_path):
    t = make_tree(tmp_path)
    f = t.root / "notes.bin"
    f.write_bytes(os.urandom(70_000))
    jam("stash", "notes.bin", cwd=t.root)
    assert is_stub(f)
    _scribble(f)
    written = b3(f)
    assert _dirty(t.root) == 1
    for args in (("doctor",), ("doctor", "--fix")):  # each saves the catalog's rows
        jam(*args, cwd=t.root, check=None)
        assert _dirty(t.root) == 1, args  # still read, still dirty: not vouched for by a stamp
    res = jam("checkout", "notes.bin", cwd=t.root, check=None)
    assert res.returncode != 0
    assert b3(f) == written  # what the app wrote is not fetched over

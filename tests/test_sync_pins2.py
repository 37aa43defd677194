"""Issue 15 (brief V4, gap 2): after `jam sync`, the stubs a merged pin now pins are local, as
`jam pin` would have them (the checkout's verified fetch); a fetch that fails is one line and
exit 1, and the sync itself still stands. Two roots on one machine stand in for two computers
(tests/test_sync.py's helpers: the real `jam`, real files, real xattrs, one dir remote)."""

from __future__ import annotations

import os

from jam_core.objects import object_relpath
from tests.safety_support import b3, is_stub, record
from tests.test_sync import run, sync, two
from tests.test_sync_pins import pins


def test_a_pin_merged_by_sync_fetches_the_files_it_pins(tmp_path):
    _t, a, b = two(tmp_path)
    assert is_stub(b / "docs/one.txt") and is_stub(b / "docs/two.txt")
    run(a, "pin", "docs", machine="aaa")
    sync(a, "aaa")
    res = sync(b, "bbb")
    assert pins(b, "bbb") == {"docs"}, res.out + res.err
    assert not is_stub(b / "docs/one.txt") and not is_stub(b / "docs/two.txt"), res.out + res.err
    assert (b / "docs/one.txt").read_bytes() == b"one\n"
    assert (b / "docs/two.txt").read_bytes() == b"two\n"
    assert "fetched 2 pinned files" in res.out, res.out
    assert is_stub(b / "big.bin"), "only what a pin names comes back"

    # a file that arrives under a pin both sides have comes back local too
    (a / "docs/three.txt").write_bytes(b"three\n")
    sync(a, "aaa")
    res = sync(b, "bbb")
    assert not is_stub(b / "docs/three.txt") and (b / "docs/three.txt").read_bytes() == b"three\n", res.out


def test_a_pinned_file_that_cannot_be_fetched_is_one_line_and_the_sync_stands(tmp_path):
    t, a, b = two(tmp_path)
    run(a, "pin", "docs", machine="aaa")
    sync(a, "aaa")
    oid = record(b / "docs/one.txt").oid
    obj = t.remote / "objects" / object_relpath(oid)
    saved = obj.read_bytes()
    os.chmod(obj, 0o644)
    obj.write_bytes(bytes([saved[0] ^ 0xFF]) + saved[1:])  # the remote's copy went bad (same size)
    res = sync(b, "bbb", check=1)
    lines = [line for line in res.err.splitlines() if "docs/one.txt" in line]
    assert len(lines) == 1 and lines[0].startswith("jam: ") and "not fetched" in lines[0], res.err
    assert "Traceback" not in res.err
    # the sync stands: the pin merged, the other pinned file fetched, B's head written
    assert pins(b, "bbb") == {"docs"}
    assert is_stub(b / "docs/one.txt") and not is_stub(b / "docs/two.txt")
    heads = run(b, "log", machine="bbb").out
    assert heads.strip(), heads
    # the remote's copy is good again: the next sync fetches it and exits 0
    obj.write_bytes(saved)
    sync(b, "bbb")
    assert not is_stub(b / "docs/one.txt") and b3(b / "docs/one.txt") == b3(a / "docs/one.txt")

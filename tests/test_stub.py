"""The stub format: the packed xattr record and the header block, and hostile values in both."""

from __future__ import annotations

import json
import struct

import pytest

from jam_core.objects import is_valid_oid, object_relpath
from jam_core.stub import HEADER_MAX, MAGIC, BadStub, StubRecord

OID = "b3:" + "ab" * 32
REC = StubRecord(OID, 123_456, 0o640, 1_700_000_000_123_456_789, ("default", "far"), "2026-11-25T10:00:00Z")


def test_record_round_trips_and_fits_in_the_inode():
    raw = REC.pack()
    assert len(raw) <= 64
    back = StubRecord.unpack(raw)
    assert (back.oid, back.size, back.mode, back.mtime_ns) == (REC.oid, REC.size, REC.mode, REC.mtime_ns)


def test_header_is_readable_and_round_trips():
    head = REC.header("report 2024.pdf")
    assert head.startswith(MAGIC) and len(head) <= HEADER_MAX
    text = head.decode("ascii")
    assert "jam checkout" in text and "report 2024.pdf" in text
    back = StubRecord.from_header(head + b"\0" * 100)
    assert back == REC


def test_header_of_hostile_name_stays_one_block_and_ascii():
    name = "\udcff\n" * 2000  # newlines and undecodable bytes, far too long
    head = REC.header(name)
    assert len(head) <= HEADER_MAX
    head.decode("ascii")
    assert StubRecord.from_header(head).oid == OID


def _packed(version=1, algo=1, digest=b"\xab" * 32, size=10, mode=0o644, mtime=0):
    return struct.pack("<BB32sQIq", version, algo, digest, size, mode, mtime)


@pytest.mark.parametrize("raw, why", [
    (b"", "bytes"),
    (b"garbage", "bytes"),
    (_packed() + b"x", "bytes"),
    (_packed(version=99), "version"),
    (_packed(algo=7), "algorithm"),
    (_packed(size=1 << 60), "size"),
    (_packed(mode=0o170777), "mode"),
])
def test_hostile_xattr_values_are_refused(raw, why):
    with pytest.raises(BadStub, match=why):
        StubRecord.unpack(raw)


def _header(**meta):
    base = {"jam": 1, "id": OID, "size": 10, "mode": "0644", "mtime_ns": 0, "remotes": [], "stashed_at": ""}
    base.update(meta)
    return MAGIC + b"notice\n" + json.dumps(base).replace(", ", ",").replace(": ", ":").encode() + b"\n"


@pytest.mark.parametrize("head, why", [
    (b"hello", "no jam stub header"),
    (MAGIC + b'{"jam":1, broken\n', "JSON"),
    (_header(id="b3:../../../etc/passwd"), "malformed object id"),
    (_header(id="md5:" + "0" * 64), "malformed object id"),
    (_header(size=-1), "size"),
    (_header(size=10**30), "size"),
    (_header(size="10"), "size"),
    (_header(mode="0o999"), "mode"),
    (_header(mode="7777777"), "mode"),
    (_header(mtime_ns=1.5), "mtime"),
    (_header(remotes="default"), "remotes"),
    (_header(jam=2), "version"),
])
def test_hostile_headers_are_refused(head, why):
    with pytest.raises(BadStub, match=why):
        StubRecord.from_header(head)


@pytest.mark.parametrize("oid, ok", [
    (OID, True),
    ("sha256:" + "0" * 64, True),
    ("b3:" + "A" * 64, False),
    ("b3:" + "0" * 63, False),
    ("b3:../" + "0" * 61, False),
    ("b3:" + "0" * 64 + "\n", False),
    (None, False),
])
def test_object_ids_are_validated(oid, ok):
    assert is_valid_oid(oid) is ok
    if ok:
        assert object_relpath(oid).count("/") == 2 and ".." not in object_relpath(oid)
    else:
        with pytest.raises(ValueError):
            object_relpath(oid)


def test_the_stat_rule_of_a_dirty_stub():
    from jam_core.stub import BadStub, is_dirty

    raw = REC.pack()

    class St:  # the fields of os.stat_result that the check reads
        st_size, st_mtime_ns, st_blocks, st_blksize = REC.size, REC.mtime_ns, 8, 4096
    assert is_dirty(St, REC) is False
    St.st_mtime_ns += 1
    assert is_dirty(St, REC) is True
    St.st_mtime_ns -= 1
    St.st_blocks = 80
    assert is_dirty(St, REC) is True
    for bad in (b"", raw[:-1], b"\x63" + raw[1:], raw[:1] + b"\x09" + raw[2:]):
        with pytest.raises(BadStub):
            StubRecord.unpack(bad)

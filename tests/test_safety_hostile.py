"""Metadata is input (invariant 7): hostile `user.jam` values and hostile header blocks are
refused with a clear message, never a traceback, and nothing is written outside the root or
the remote. And names are bytes: spaces, newlines and non-UTF-8 names round-trip."""

from __future__ import annotations

import json
import os
import struct

import pytest

from jam_core.stub import MAGIC, XATTR, StubRecord
from tests.conftest import make_file
from tests.safety_support import b3, fingerprint, is_stub, jam, listing, make_tree, record, status_json

SIZE = 300_000
GOOD = StubRecord(oid="b3:" + "ab" * 32, size=SIZE, mode=0o644, mtime_ns=1_700_000_000_000_000_000)
_PACK = struct.Struct("<BB32sQIq")


def _packed(version=1, code=1, size=SIZE, mode=0o644):
    return _PACK.pack(version, code, bytes(32), size, mode, GOOD.mtime_ns)


HOSTILE_XATTRS = {
    "garbage": b"../../../canary/pwned",
    "empty": b"",
    "one byte short": GOOD.pack()[:-1],
    "one byte long": GOOD.pack() + b"\0",
    "version 99": _packed(version=99),
    "unknown algorithm": _packed(code=7),
    "absurd size": _packed(size=1 << 62),
    "absurd mode": _packed(mode=0o177777),
}


@pytest.fixture
def scene(tmp_path):
    t = make_tree(tmp_path)
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("canary")
    return t, canary


def _fake_stub(path, header: bytes = b"", size: int = SIZE, mtime_ns: int = GOOD.mtime_ns):
    """A read-only sparse file, like a stub: ``header`` then a hole."""
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    os.chmod(path, 0o444)


def _untouched(t, canary, before, fps):
    assert listing(canary) == before["canary"]
    assert listing(t.remote, dir_times=False) == before["remote"]
    def outside_jam(d):
        return {k for k in d if not k.startswith(b"root/.jam")}
    assert outside_jam(listing(t.root.parent)) == outside_jam(before["all"])  # nothing new anywhere
    for p, fp in fps.items():
        assert fingerprint(p) == fp, p


def _snapshot(t, canary):
    return {"canary": listing(canary), "remote": listing(t.remote, dir_times=False), "all": listing(t.root.parent)}


@pytest.mark.parametrize("kind", sorted(HOSTILE_XATTRS))
def test_hostile_xattr_is_refused_everywhere(scene, kind):
    t, canary = scene
    p = t.root / "evil"
    _fake_stub(p, GOOD.header("evil"))
    os.setxattr(p, XATTR, HOSTILE_XATTRS[kind])
    make_file(t.root / "fine", SIZE, seed=1)
    fps = {p: fingerprint(p)}
    before = _snapshot(t, canary)

    st = status_json(t.root)
    assert st["total"]["bad"] == 1 and [x["path"] for x in st["problems"]] == ["evil"], st
    res = jam("checkout", "evil", cwd=t.root, check=1)
    assert res.err.startswith("jam: failed: evil: unreadable stub metadata"), res.err
    assert len(res.err.splitlines()) == 1
    res = jam("stash", "evil", cwd=t.root, check=None)
    assert "evil: unreadable stub metadata" in res.err and not res.err.count("\n") > 1, res.err
    for args in (["doctor"], ["doctor", "--deep"]):
        res = jam(*args, "--json", cwd=t.root, check=1)
        probs = json.loads(res.out)["problems"]
        assert [(x["kind"], x["path"], x["fixed"]) for x in probs] == [("bad-metadata", "evil", False)], probs
    _untouched(t, canary, before, fps)
    # the good file beside it still stashes and comes back
    jam("stash", "fine", cwd=t.root)
    jam("checkout", "fine", cwd=t.root)
    assert fingerprint(p) == fps[p]
    # The header beside the damaged xattr is intact: `doctor --fix` restores user.jam from it
    # (issue 8), writing nothing else; its object was never stored, which doctor then says.
    res = jam("doctor", "--fix", "--json", cwd=t.root, check=1)
    probs = json.loads(res.out)["problems"]
    assert [(x["kind"], x["path"], x["fixed"]) for x in probs] == [("bad-metadata", "evil", True),
                                                                    ("missing", "evil", False)], probs
    assert record(p) == StubRecord(GOOD.oid, GOOD.size, GOOD.mode, GOOD.mtime_ns)
    assert listing(canary) == before["canary"]


def _header(meta: dict | bytes) -> bytes:
    line = meta if isinstance(meta, bytes) else json.dumps(meta, separators=(",", ":")).encode()
    return MAGIC + b"This file is stored by jam.\n" + line + b"\n"


def _meta(**kw):
    m = {"jam": 1, "id": GOOD.oid, "size": SIZE, "mode": "0644", "mtime_ns": GOOD.mtime_ns,
         "remotes": ["vault"], "stashed_at": "2024-01-01T00:00:00Z", "name": "evil"}
    m.update(kw)
    return m


HOSTILE_HEADERS = {
    "id with ../": _header(_meta(id="b3:../../../../canary/pwned")),
    "id with ../ in the digest": _header(_meta(id="b3:" + "../" * 21 + "x")),
    "sha256 id with a slash": _header(_meta(id="sha256:/etc/passwd")),
    "absurd size": _header(_meta(size=1 << 62)),
    "negative size": _header(_meta(size=-1)),
    "size as a string": _header(_meta(size="300000")),
    "size that is not the file's": _header(_meta(size=SIZE - 1)),
    "bad JSON": _header(b'{"jam":1,"id":"b3:' + b"ab" * 32 + b'",'),
    "not an object": _header(b'{"jam":1}' + b"[]"),
    "version 99": _header(_meta(jam=99)),
    "mode not octal": _header(_meta(mode="rwxr-xr-x")),
    "remotes not names": _header(_meta(remotes=[{"../x": 1}])),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_HEADERS))
def test_hostile_header_is_never_repaired_from(scene, kind):
    """A file that lost its xattrs is repaired from its header by `doctor --fix`; a hostile
    header must be reported instead, and nothing written anywhere."""
    t, canary = scene
    p = t.root / "evil"
    _fake_stub(p, HOSTILE_HEADERS[kind])
    fps = {p: fingerprint(p)}
    before = _snapshot(t, canary)

    for args in (["doctor", "--json"], ["doctor", "--fix", "--json"], ["doctor", "--fix", "--deep", "--json"]):
        res = jam(*args, cwd=t.root, check=1)
        probs = json.loads(res.out)["problems"]
        assert [(x["kind"], x["path"], x["fixed"]) for x in probs] == [("bad-metadata", "evil", False)], probs
    assert record(p) is None
    # A file that starts like a stub header that cannot be trusted is refused, not fetched over
    res = jam("checkout", "evil", cwd=t.root, check=1)
    assert res.err.startswith("jam: failed: evil: unreadable stub metadata"), res.err
    st = status_json(t.root)
    assert st["total"]["stubs"] == 0, st
    _untouched(t, canary, before, fps)


def test_header_with_a_hostile_name_repairs_only_the_xattr(scene):
    """A valid header whose name field points elsewhere: the name is never used as a path."""
    t, canary = scene
    data = make_file(t.root / "real", SIZE, seed=3)
    jam("stash", "real", cwd=t.root)
    rec = record(t.root / "real")
    p = t.root / "copy"
    hdr = rec.header("../../canary/pwned")
    _fake_stub(p, hdr, mtime_ns=rec.mtime_ns)  # a `cp` of the stub that lost its xattrs
    before = _snapshot(t, canary)

    res = jam("doctor", "--fix", "--json", cwd=t.root)
    probs = json.loads(res.out)["problems"]
    assert [(x["kind"], x["path"], x["fixed"]) for x in probs] == [("lost-xattr", "copy", True)]
    assert record(p) == StubRecord.unpack(rec.pack())
    assert listing(canary) == before["canary"] and listing(t.remote, dir_times=False) == before["remote"]
    jam("checkout", "copy", cwd=t.root)
    assert p.read_bytes() == data and listing(canary) == before["canary"]


# -- 8. names are bytes ---------------------------------------------------------------------------

NAMES = [b"with space", b"new\nline", b"latin1-\xe9t\xe9", b"\xff\xfe bytes", b"tab\there", b" leading",
         b"-dash", b"back\\slash"]


def test_odd_names_round_trip(tmp_path):
    t = make_tree(tmp_path)
    rb = os.fsencode(t.root)
    d = os.path.join(rb, b"dir \xff\nname")
    os.mkdir(d)
    digests = {}
    for i, n in enumerate(NAMES):
        for parent in (rb, d):
            p = os.path.join(parent, n)
            with open(p, "wb") as f:
                f.write(os.urandom(100_000 + i))
            digests[p] = b3(p)

    jam("stash", b".", cwd=t.root)
    assert all(is_stub(p) for p in digests), [p for p in digests if not is_stub(p)]

    st = status_json(t.root)
    assert st["total"]["stubs"] == len(digests) and st["total"]["local"] == 0
    dirs = {os.fsencode(x["path"]) for x in st["directories"]}
    assert dirs == {b".", b"dir \xff\nname"}, dirs
    jam("doctor", "--deep", cwd=t.root)

    # named explicitly, as bytes, from inside the odd directory
    one = os.path.join(d, NAMES[1])
    jam("checkout", NAMES[1], cwd=d)
    assert b3(one) == digests[one] and not is_stub(one)
    res = jam("status", cwd=t.root)  # the human table escapes names onto one line each
    assert "\\n" in res.out and "\n" + "line" not in res.out

    jam("checkout", b".", cwd=t.root)
    assert {p: b3(p) for p in digests} == digests
    assert not any(is_stub(p) for p in digests)
    jam("stash", os.path.join(d, NAMES[3]), cwd=t.root)
    assert is_stub(os.path.join(d, NAMES[3]))

"""The parsed-config cache (jam_core/root.py: ``_read_toml``): the cd hook's fetch reads a
root's config.toml through ``.config.toml.cache`` (JSON) beside it, keyed by the TOML file's
device, inode, size, mtime and ctime. It must never answer for a file that changed, never be
taken from a file someone else could have written, and never be written for a file changed in
the last clock tick. Real files; no timing assertions."""

from __future__ import annotations

import json
import os
import sys

import pytest

import jam_core.root as rootmod
from jam_core.errors import UsageError


def _old(path, seconds=60):
    """Date a file (mtime) in the past; its ctime stays now, so also move the racy window."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(rootmod, "RACY_S", 0.0)  # files made by the test are "old enough"
    p = tmp_path / "config.toml"
    p.write_text('[hook]\ndepth = 1\n[remote.a]\nkind = "dir"\n')
    return p


def cache_of(p):
    return p.parent / f".{p.name}.cache"


def test_a_second_read_comes_from_the_cache_without_tomllib(cfg, monkeypatch):
    assert rootmod._read_toml(cfg) == {"hook": {"depth": 1}, "remote": {"a": {"kind": "dir"}}}
    assert cache_of(cfg).is_file() and (cache_of(cfg).stat().st_mode & 0o777) == 0o600

    def boom(*a, **k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(rootmod, "_parse_toml", boom)
    assert rootmod._read_toml(cfg) == {"hook": {"depth": 1}, "remote": {"a": {"kind": "dir"}}}


def test_the_cache_is_read_without_importing_tomllib(cfg, tmp_path):
    rootmod._read_toml(cfg)
    import subprocess

    code = ("import sys, jam_core.root as r\n"
            f"d = r._read_toml({str(cfg)!r})\n"
            "print(d['hook']['depth'], 'tomllib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "False"], out.stderr


def test_an_edit_in_place_with_the_same_size_is_seen(cfg):
    rootmod._read_toml(cfg)
    with open(cfg, "r+") as f:  # same inode, same size, same mtime put back: the ctime moves
        st = os.stat(cfg)
        f.write('[hook]\ndepth = 2\n')
        f.flush()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert rootmod._read_toml(cfg)["hook"]["depth"] == 2


def test_a_replaced_file_is_seen(cfg):
    rootmod._read_toml(cfg)
    new = cfg.with_name("new.toml")
    new.write_text('[hook]\ndepth = 3\n[remote.a]\nkind = "dir"\n')
    os.replace(new, cfg)
    assert rootmod._read_toml(cfg)["hook"]["depth"] == 3


def test_a_planted_cache_is_not_trusted(cfg, tmp_path):
    """A cache with the right key but made by someone else (not ours, writable by others,
    a symlink, not a regular file) is ignored: the TOML is parsed."""
    st = os.fstat(os.open(cfg, os.O_RDONLY))
    key = rootmod._cache_key(st)
    lie = json.dumps({"key": key, "data": {"hook": {"depth": 99}}})
    c = cache_of(cfg)
    c.write_text(lie)
    c.chmod(0o666)
    assert rootmod._read_toml(cfg)["hook"]["depth"] == 1, "a cache writable by others was trusted"
    c.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(lie)
    elsewhere.chmod(0o600)
    c.symlink_to(elsewhere)
    assert rootmod._read_toml(cfg)["hook"]["depth"] == 1, "a symlinked cache was followed"
    c.unlink()
    os.mkfifo(c)
    assert rootmod._read_toml(cfg)["hook"]["depth"] == 1  # a FIFO: never blocks, never read
    c.unlink()
    c.write_text(lie)
    c.chmod(0o600)
    os.chown(c, 12345, 12345)  # tests run as root: a file of another uid
    assert rootmod._read_toml(cfg)["hook"]["depth"] == 1, "another user's cache was trusted"


@pytest.mark.parametrize("junk", [b"", b"\0" * 64, b"[1, 2]", b'{"key": 1, "data": {}}', b"{not json",
                                  b'{"key": null, "data": []}'])
def test_a_damaged_cache_is_parsed_around(cfg, junk):
    rootmod._read_toml(cfg)
    c = cache_of(cfg)
    c.write_bytes(junk)
    c.chmod(0o600)
    assert rootmod._read_toml(cfg) == {"hook": {"depth": 1}, "remote": {"a": {"kind": "dir"}}}


def test_no_cache_for_a_file_changed_within_the_racy_window(cfg, monkeypatch):
    monkeypatch.setattr(rootmod, "RACY_S", 3600.0)
    rootmod._read_toml(cfg)
    assert not cache_of(cfg).exists()


def test_dates_are_never_cached(cfg):
    cfg.write_text("[core]\nsince = 2026-12-01T10:00:00Z\n")
    first = rootmod._read_toml(cfg)
    assert not cache_of(cfg).exists()
    assert rootmod._read_toml(cfg) == first


def test_bad_toml_still_says_so(cfg):
    rootmod._read_toml(cfg)
    cfg.write_text("[hook\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        rootmod._read_toml(cfg)

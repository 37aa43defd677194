"""The conformance kit every jam backend runs (dir, sftp, and any third-party one).

Subclass :class:`BackendConformance` as ``TestMyBackend`` in a pytest module and provide:

* a ``remote`` fixture: a :class:`jam_core.model.Remote` of your kind on a fresh, empty,
  writable location, set up as ``jam remote add`` would (``check_remote(create=True)`` then
  ``remote_id(create=True)``; :meth:`BackendConformance.set_up` does both);
* a ``pm`` fixture: a plugin manager with your backend registered
  (``make_plugin_manager(extra=(my_plugin,))``, or the built-ins);
* the fault-injection hooks below (``corrupt_object``, ``remove_object``, ``take_down``,
  ``bring_back``, ``hide_location``, ``unhide_location``, ``location_exists``, ``fill_up``,
  ``list_tmp``, ``put_tmp``, ``write_marker``, ``put_meta_oddity``, ``hold_meta``). A hook left
  as it is makes the cases that need it skip, with the hook's name in the reason;
* ``factory = "module:function"``: an importable function ``f(remote) -> (pm, remote)`` a child
  process calls to build its plugin manager (the kill-mid-transfer cases). The default builds
  the built-ins and the installed entry points.

Every case talks to the backend through its hooks only (``stash``, ``stash_many``, ``fetch``,
``fetch_many``, ``has``, ``hash_object``, ``list_objects``, ``check_remote``, ``remote_id``, and the
removal hooks ``remove``, ``write_meta``, ``read_meta``, ``list_meta``, ``free_space``: a backend
without one of those skips its cases, with the hook's name in the reason), with real
bytes; the hooks above are the only places a case reaches behind the backend, and only to inject a fault.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from jam_core.errors import IntegrityError, JamError, RemoteError
from jam_core.fs import part_name
from jam_core.model import Remote, Session
from jam_core.objects import hash_file

KiB = 1024
MiB = 1024 * 1024
SIZES = (1, 64 * KiB, 3 * MiB)  # jam never stores an empty file
BIG = 3 * MiB  # what fill_up must leave no room for
CHILD_DONE = 3  # exit status of a child whose transfer ended before half its bytes were reported


def builtin_factory(remote: Remote) -> tuple[Any, Remote]:
    """The default ``factory``: jam's built-in plugins and the installed entry points."""
    from jam_core.manager import make_plugin_manager

    return make_plugin_manager(), remote


def _bytes(size: int, seed: int) -> bytes:
    return random.Random(f"{seed}:{size}").randbytes(size)


def _one_line(exc: BaseException, remote: Remote, named: bool = False) -> str:
    """The error's message is one line (and, with ``named``, says which remote failed)."""
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, f"not one line: {text!r}"
    if named:
        assert remote.name in text, f"the message does not name the remote {remote.name!r}: {text!r}"
    return text


def _not_stored_error(outcome: object) -> bool:
    """A per-item failure: an IntegrityError, or a JamError that is not a RemoteError."""
    return isinstance(outcome, JamError) and not isinstance(outcome, RemoteError)



def _same(a: bytes, b: bytes) -> bool:
    """Byte equality as one bool: an assert on ``a == b`` of megabytes would make pytest diff
    them (minutes of difflib) before saying they differ."""
    return a == b

class BackendConformance:
    """The cases every backend must pass. pytest collects subclasses named ``Test*``."""

    factory: str = "jam_core.testing.backend:builtin_factory"
    sweeps_parts: bool = True  # the backend removes parts of dead jams from tmp/ (dir, sftp do)

    # -- fault injection: override in the subclass ---------------------------------------------

    def corrupt_object(self, remote: Remote, oid: str) -> None:
        """Flip bytes of the stored object ``oid`` in place (same size)."""
        raise NotImplementedError

    def remove_object(self, remote: Remote, oid: str) -> None:
        """Delete the stored object ``oid``."""
        raise NotImplementedError

    def take_down(self, remote: Remote) -> None:
        """Make the remote unreachable (stop the server, unmount, rename its directory)."""
        raise NotImplementedError

    def bring_back(self, remote: Remote) -> None:
        """Undo :meth:`take_down`."""
        raise NotImplementedError

    def hide_location(self, remote: Remote) -> None:
        """Make the remote's location vanish while its server (if any) still answers
        (an unplugged drive, a renamed directory). Defaults to :meth:`take_down`."""
        self.take_down(remote)

    def unhide_location(self, remote: Remote) -> None:
        """Undo :meth:`hide_location`. Defaults to :meth:`bring_back`."""
        self.bring_back(remote)

    def location_exists(self, remote: Remote) -> bool:
        """Whether anything exists at the remote's location (checked while it is hidden: a
        backend must never re-create a location that vanished)."""
        raise NotImplementedError

    def fill_up(self, remote: Remote) -> None:
        """Make the remote so full that an object of 3 MiB cannot be stored, while a few small
        ones (a few bytes each) still can. May ``pytest.skip`` if the backend cannot simulate
        it (the built-in dir and sftp backends do not skip)."""
        raise NotImplementedError

    def list_tmp(self, remote: Remote) -> list[str]:
        """The names under the remote's ``tmp/``."""
        raise NotImplementedError

    def put_tmp(self, remote: Remote, name: str, data: bytes) -> None:
        """Create ``tmp/name`` on the remote holding ``data`` (a part left by another jam)."""
        raise NotImplementedError

    def write_marker(self, remote: Remote, data: bytes | None) -> None:
        """Replace the identity marker (``objects.MARKER_NAME``) with ``data``; None removes it."""
        raise NotImplementedError

    def put_meta_oddity(self, remote: Remote, name: str, what: str) -> None:
        """Create at ``meta/NAME`` on the remote, behind the backend's back, ``what``:
        ``"symlink"`` (to a regular file outside ``meta/`` holding ``b"secret"``), ``"symlink_dir"``
        (to a directory outside ``meta/`` holding a regular file ``x``), ``"dir"``, ``"fifo"``, or
        ``"huge"`` (a sparse regular file of 256 MiB + 1 byte: past every backend's META_MAX).
        Parent directories are made as needed. Raise NotImplementedError for a ``what`` the store
        cannot hold (an object store has no symlinks): the cases that need it skip."""
        raise NotImplementedError

    def hold_meta(self, remote: Remote, name: str):
        """A readable binary file object open on the current ``meta/NAME`` (a reader in the
        middle of its read: after an atomic replace it still reads the old content whole)."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def set_up(pm, remote: Remote) -> str:
        """What ``jam remote add`` does to a new location: returns the remote's id."""
        with Session() as s:
            pm.hook.check_remote(remote=remote, session=s, create=True)
            rid = pm.hook.remote_id(remote=remote, session=s, create=True)
        assert isinstance(rid, str) and rid, f"remote_id(create=True) returned {rid!r}"
        return rid

    def _hook(self, name: str, *args):
        try:
            return getattr(self, name)(*args)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not implement the fault hook {name}()")

    @staticmethod
    def _file(tmp_path: Path, data: bytes, name: str | None = None) -> tuple[Path, str, int]:
        fd, path = tempfile.mkstemp(dir=tmp_path, prefix=name or "src-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        oid, size = hash_file(path)
        return Path(path), oid, size

    @staticmethod
    def _dest(tmp_path: Path) -> Path:
        fd, path = tempfile.mkstemp(dir=tmp_path, prefix="dest-")
        os.close(fd)
        return Path(path)

    def _stash(self, pm, remote: Remote, path: Path, oid: str, size: int, session: Session | None = None):
        with self._session(session) as s:
            return pm.hook.stash(remote=remote, oid=oid, source=path, size=size, session=s)

    @staticmethod
    @contextmanager
    def _session(session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
            return
        with Session() as s:
            yield s

    def _fetch(self, pm, remote: Remote, oid: str, size: int, tmp_path: Path, session: Session | None = None):
        """(outcome, bytes written): the outcome is fetch's answer or the exception it raised."""
        dest = self._dest(tmp_path)
        with self._session(session) as s:
            try:
                outcome = pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=s)
            except JamError as exc:
                outcome = exc
        data = dest.read_bytes()
        dest.unlink()
        return outcome, data

    def _assert_holds(self, pm, remote: Remote, data: bytes, oid: str, tmp_path: Path) -> None:
        """The remote holds ``oid`` and it fetches back as exactly ``data``."""
        with Session() as s:
            assert pm.hook.has(remote=remote, oid=oid, size=len(data), session=s) is True, f"{oid} is not held"
            outcome, got = self._fetch(pm, remote, oid, len(data), tmp_path, s)
        assert outcome is True, f"fetch of {oid} answered {outcome!r}"
        assert _same(got, data), f"{oid} fetched back {len(got)} bytes that are not its content"

    @staticmethod
    def _many(results) -> dict[str, object]:
        if results is None:
            return None
        out = {}
        for oid, outcome in results:
            assert oid not in out, f"{oid} answered twice"
            out[oid] = outcome
        return out

    def _new_tmp(self, remote: Remote, before: list[str]) -> list[str]:
        return sorted(set(self._hook("list_tmp", remote)) - set(before))

    # -- 1. round trip ------------------------------------------------------------------------

    def test_round_trip(self, pm, remote, tmp_path):
        stored = []
        for seed, size in enumerate(SIZES):
            data = _bytes(size, seed)
            path, oid, n = self._file(tmp_path, data)
            assert self._stash(pm, remote, path, oid, n) is True, f"stash of {size} bytes did not answer True"
            stored.append((data, oid))
        for data, oid in stored:
            self._assert_holds(pm, remote, data, oid, tmp_path)
            with Session() as s:
                for wrong in (len(data) + 1, len(data) - 1):
                    assert pm.hook.has(remote=remote, oid=oid, size=wrong, session=s) is False, \
                        f"has() says {len(data)} bytes are held as {wrong}"
        _, unknown, _ = self._file(tmp_path, b"never stored")
        with Session() as s:
            assert pm.hook.has(remote=remote, oid=unknown, size=12, session=s) is False, "has() of an unknown id"

        # the batch hooks, when the backend has them
        batch = []
        for seed, size in enumerate(SIZES, start=10):
            data = _bytes(size, seed)
            path, oid, n = self._file(tmp_path, data)
            batch.append((oid, path, n, data))
        with Session() as s:
            out = self._many(pm.hook.stash_many(remote=remote, items=[(o, p, n) for o, p, n, _ in batch], session=s))
        if out is not None:
            assert out == {o: None for o, *_ in batch}, f"stash_many answered {out!r}"
        else:
            for oid, path, n, _ in batch:
                assert self._stash(pm, remote, path, oid, n) is True
        dests = {oid: self._dest(tmp_path) for oid, *_ in batch}
        with Session() as s:
            got = self._many(pm.hook.fetch_many(remote=remote, items=[(o, dests[o], n) for o, _, n, _ in batch],
                                                session=s))
        if got is not None:
            assert got == {o: True for o, *_ in batch}, f"fetch_many answered {got!r}"
            for oid, _, _, data in batch:
                assert _same(dests[oid].read_bytes(), data), f"fetch_many wrote wrong bytes for {oid}"
        for oid, _, _, data in batch:
            self._assert_holds(pm, remote, data, oid, tmp_path)

    # -- 2. an existing corrupt object is never trusted ---------------------------------------

    def test_corrupt_existing_object_is_not_trusted(self, pm, remote, tmp_path):
        for seed, size in ((20, 64 * KiB), (21, 1)):
            data = _bytes(size, seed)
            path, oid, n = self._file(tmp_path, data)
            assert self._stash(pm, remote, path, oid, n) is True
            self._hook("corrupt_object", remote, oid)
            outcome, got = self._fetch(pm, remote, oid, n, tmp_path)
            assert not _same(got, data), "corrupt_object() did not change the stored bytes"
            try:
                answer = self._stash(pm, remote, path, oid, n)
            except JamError:
                continue  # refusing is allowed; claiming "stored" over garbage is not
            assert answer is True
            self._assert_holds(pm, remote, data, oid, tmp_path)

        data = _bytes(64 * KiB, 22)
        path, oid, n = self._file(tmp_path, data)
        assert self._stash(pm, remote, path, oid, n) is True
        self._hook("corrupt_object", remote, oid)
        with Session() as s:
            out = self._many(pm.hook.stash_many(remote=remote, items=[(oid, path, n)], session=s))
        if out is not None and out.get(oid) is None:
            self._assert_holds(pm, remote, data, oid, tmp_path)

    # -- 3. content that does not hash to its id ----------------------------------------------

    def test_content_not_matching_its_id_is_refused(self, pm, remote, tmp_path):
        before = self._hook("list_tmp", remote)
        data = _bytes(64 * KiB, 30)
        path, real, n = self._file(tmp_path, data)
        for seed in (31, 32):
            _, wrong, _ = self._file(tmp_path, _bytes(64 * KiB, seed))
            if seed == 31:
                with pytest.raises(IntegrityError):
                    self._stash(pm, remote, path, wrong, n)
            else:
                with Session() as s:
                    out = self._many(pm.hook.stash_many(remote=remote, items=[(wrong, path, n)], session=s))
                if out is None:
                    continue
                assert isinstance(out[wrong], IntegrityError), f"stash_many answered {out[wrong]!r}"
            with Session() as s:
                assert pm.hook.has(remote=remote, oid=wrong, size=n, session=s) is False
            outcome, _ = self._fetch(pm, remote, wrong, n, tmp_path)
            assert outcome is False, f"fetch of the refused id answered {outcome!r}"
        with Session() as s:
            assert pm.hook.has(remote=remote, oid=real, size=n, session=s) is False
        assert self._new_tmp(remote, before) == [], "a refused store left its part in tmp/"

    # -- 4. wrong size ------------------------------------------------------------------------

    def test_fetch_with_a_wrong_size_fails_that_item(self, pm, remote, tmp_path):
        data = _bytes(64 * KiB, 40)
        path, oid, n = self._file(tmp_path, data)
        assert self._stash(pm, remote, path, oid, n) is True
        for wrong in (n - 1, n + 1, 1, 4096):
            outcome, got = self._fetch(pm, remote, oid, wrong, tmp_path)
            assert outcome is False or _not_stored_error(outcome), \
                f"fetch of {n} bytes as {wrong} answered {outcome!r}"
            assert len(got) <= wrong, f"fetch with size {wrong} wrote {len(got)} bytes"
        dests = [self._dest(tmp_path), self._dest(tmp_path)]
        other_path, other, m = self._file(tmp_path, _bytes(KiB, 41))
        assert self._stash(pm, remote, other_path, other, m) is True
        with Session() as s:
            got = self._many(pm.hook.fetch_many(remote=remote, items=[(oid, dests[0], n - 1), (other, dests[1], m)],
                                                session=s))
        if got is not None:
            assert got[oid] is False or _not_stored_error(got[oid]), f"fetch_many answered {got[oid]!r}"
            assert os.path.getsize(dests[0]) <= n - 1
            assert got[other] is True and _same(dests[1].read_bytes(), _bytes(KiB, 41)), "the other item failed too"
        self._assert_holds(pm, remote, data, oid, tmp_path)

    # -- 5. missing object --------------------------------------------------------------------

    def test_missing_object_is_false(self, pm, remote, tmp_path):
        _, unknown, u = self._file(tmp_path, _bytes(100, 50))
        outcome, _ = self._fetch(pm, remote, unknown, u, tmp_path)
        assert outcome is False, f"fetch of an unknown object answered {outcome!r}"
        data = _bytes(64 * KiB, 51)
        path, gone, n = self._file(tmp_path, data)
        assert self._stash(pm, remote, path, gone, n) is True
        self._hook("remove_object", remote, gone)
        outcome, _ = self._fetch(pm, remote, gone, n, tmp_path)
        assert outcome is False, f"fetch of a removed object answered {outcome!r}"
        with Session() as s:
            assert pm.hook.has(remote=remote, oid=gone, size=n, session=s) is False
        here_path, here, h = self._file(tmp_path, _bytes(KiB, 52))
        assert self._stash(pm, remote, here_path, here, h) is True
        dests = {o: self._dest(tmp_path) for o in (unknown, gone, here)}
        with Session() as s:
            got = self._many(pm.hook.fetch_many(
                remote=remote, items=[(unknown, dests[unknown], u), (gone, dests[gone], n), (here, dests[here], h)],
                session=s))
        if got is not None:
            assert got == {unknown: False, gone: False, here: True}, f"fetch_many answered {got!r}"
            assert _same(dests[here].read_bytes(), _bytes(KiB, 52))

    # -- 6. remote gone -----------------------------------------------------------------------

    def _all_refuse(self, pm, remote, tmp_path, session: Session, stored: tuple[str, int], new: tuple[Path, str, int],
                    named: bool = False):
        """Every data hook raises RemoteError in one line (the batch hooks may instead answer
        RemoteError for the item); with ``named``, each names the remote."""
        oid, size = stored
        path, new_oid, new_size = new
        with pytest.raises(RemoteError) as exc:
            pm.hook.stash(remote=remote, oid=new_oid, source=path, size=new_size, session=session)
        _one_line(exc.value, remote, named)
        dest = self._dest(tmp_path)
        with pytest.raises(RemoteError) as exc:
            pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=session)
        _one_line(exc.value, remote, named)
        with pytest.raises(RemoteError) as exc:
            pm.hook.has(remote=remote, oid=oid, size=size, session=session)
        _one_line(exc.value, remote, named)
        for hook, item in (("stash_many", (new_oid, path, new_size)), ("fetch_many", (oid, dest, size))):
            try:
                out = getattr(pm.hook, hook)(remote=remote, items=[item], session=session)
                out = None if out is None else dict(out)
            except RemoteError as err:
                _one_line(err, remote, named)
                continue
            if out is not None:
                assert isinstance(out.get(item[0]), RemoteError), f"{hook} on a remote that is gone answered {out!r}"
                _one_line(out[item[0]], remote, named)

    def test_remote_gone(self, pm, remote, tmp_path):
        data = _bytes(64 * KiB, 60)
        path, oid, n = self._file(tmp_path, data)
        new = self._file(tmp_path, _bytes(KiB, 61))
        assert self._stash(pm, remote, path, oid, n) is True
        self._hook("take_down", remote)
        try:
            with Session() as s:  # a new command
                self._all_refuse(pm, remote, tmp_path, s, (oid, n), new)
                with pytest.raises(RemoteError) as exc:
                    pm.hook.check_remote(remote=remote, session=s, create=False)
                _one_line(exc.value, remote)
            with Session() as s, pytest.raises(RemoteError) as exc:
                pm.hook.remote_id(remote=remote, session=s, create=False)
            _one_line(exc.value, remote)
        finally:
            self.bring_back(remote)
        with Session() as s:
            assert pm.hook.check_remote(remote=remote, session=s, create=False)
        self._assert_holds(pm, remote, data, oid, tmp_path)
        assert self._stash(pm, remote, *new) is True
        self._assert_holds(pm, remote, _bytes(KiB, 61), new[1], tmp_path)

    def test_errors_name_the_remote(self, pm, remote, tmp_path):
        """A user with several remotes must learn which one is gone: every RemoteError names it."""
        data = _bytes(KiB, 66)
        path, oid, n = self._file(tmp_path, data)
        new = self._file(tmp_path, _bytes(KiB, 67))
        assert self._stash(pm, remote, path, oid, n) is True
        self._hook("take_down", remote)
        try:
            with Session() as s:
                self._all_refuse(pm, remote, tmp_path, s, (oid, n), new, named=True)
            for hook in ("check_remote", "remote_id"):
                with Session() as s, pytest.raises(RemoteError) as exc:
                    getattr(pm.hook, hook)(remote=remote, session=s, create=False)
                _one_line(exc.value, remote, named=True)
        finally:
            self.bring_back(remote)

    def test_remote_gone_mid_command(self, pm, remote, tmp_path):
        """The remote goes while a command is using it: what it says next is RemoteError, not
        "stored" and not "the remote does not have it" (which would send doctor and checkout
        after a missing object)."""
        data = _bytes(64 * KiB, 64)
        path, oid, n = self._file(tmp_path, data)
        new = self._file(tmp_path, _bytes(KiB, 65))
        with Session() as under_way:
            assert self._stash(pm, remote, path, oid, n, under_way) is True
            assert pm.hook.has(remote=remote, oid=oid, size=n, session=under_way) is True
            outcome, _ = self._fetch(pm, remote, oid, n, tmp_path, under_way)
            assert outcome is True
            self._hook("take_down", remote)
            try:
                self._all_refuse(pm, remote, tmp_path, under_way, (oid, n), new)
            finally:
                self.bring_back(remote)
        self._assert_holds(pm, remote, data, oid, tmp_path)

    def test_vanished_location_is_never_recreated(self, pm, remote, tmp_path):
        data = _bytes(64 * KiB, 62)
        path, oid, n = self._file(tmp_path, data)
        new = self._file(tmp_path, _bytes(KiB, 63))
        with Session() as under_way:
            assert self._stash(pm, remote, path, oid, n, under_way) is True
            self._hook("hide_location", remote)
            try:
                assert self._hook("location_exists", remote) is False, "hide_location() left the location"
                with pytest.raises(RemoteError) as exc:  # a command under way stores no more
                    self._stash(pm, remote, *new, session=under_way)
                _one_line(exc.value, remote)
                with Session() as s:
                    self._all_refuse(pm, remote, tmp_path, s, (oid, n), new)
                    for create in (False, True):
                        with pytest.raises(RemoteError) as exc:
                            pm.hook.check_remote(remote=remote, session=s, create=create)
                        _one_line(exc.value, remote)
                        with pytest.raises(RemoteError) as exc:
                            pm.hook.remote_id(remote=remote, session=s, create=create)
                        _one_line(exc.value, remote)
                assert self.location_exists(remote) is False, "the backend re-created a location that vanished"
            finally:
                self.unhide_location(remote)
        self._assert_holds(pm, remote, data, oid, tmp_path)
        with Session() as s:
            assert pm.hook.has(remote=remote, oid=new[1], size=new[2], session=s) is False

    # -- 7. a full remote ---------------------------------------------------------------------

    def test_full_remote_fails_that_object_only(self, pm, remote, tmp_path):
        before = self._hook("list_tmp", remote)
        self._hook("fill_up", remote)
        big_path, big, b = self._file(tmp_path, _bytes(BIG, 70))
        with Session() as s:
            with pytest.raises(JamError) as exc:
                pm.hook.stash(remote=remote, oid=big, source=big_path, size=b, session=s)
            assert not isinstance(exc.value, RemoteError), f"a full disk failed the whole remote: {exc.value}"
            assert "\n" not in str(exc.value)
            assert pm.hook.has(remote=remote, oid=big, size=b, session=s) is False
            small = self._file(tmp_path, _bytes(3, 71))
            assert self._stash(pm, remote, *small, session=s) is True, "a small object no longer fits"
        assert self._new_tmp(remote, before) == [], "a failed store left its part in tmp/"
        outcome, _ = self._fetch(pm, remote, big, b, tmp_path)
        assert outcome is False
        self._assert_holds(pm, remote, _bytes(3, 71), small[1], tmp_path)

        small2 = self._file(tmp_path, _bytes(5, 72))
        with Session() as s:
            # the small one first: a backend may store a batch in parallel, and one that is
            # still writing the big one when the disk fills may fail a small one sent after it
            out = self._many(pm.hook.stash_many(remote=remote, items=[(small2[1], small2[0], small2[2]),
                                                                      (big, big_path, b)], session=s))
        if out is not None:
            assert _not_stored_error(out[big]), f"stash_many on a full disk answered {out[big]!r} for the big one"
            assert out[small2[1]] is None, f"the small one failed too: {out[small2[1]]!r}"
            self._assert_holds(pm, remote, _bytes(5, 72), small2[1], tmp_path)
            with Session() as s:
                assert pm.hook.has(remote=remote, oid=big, size=b, session=s) is False
            assert self._new_tmp(remote, before) == [], "a failed store left its part in tmp/"

    # -- 8. killed mid-transfer ---------------------------------------------------------------

    def _sparse_file(self, tmp_path: Path, seed: int) -> tuple[Path, str, int, bytes]:
        """4 MiB: 2 MiB of data, a 1 MiB hole, 1 MiB of data (a backend that copies extents
        reports progress after the first one: half the bytes)."""
        a, c = _bytes(2 * MiB, seed), _bytes(MiB, seed + 1)
        path = tmp_path / f"big-{seed}"
        with open(path, "wb") as f:
            f.write(a)
            f.seek(3 * MiB)
            f.write(c)
        oid, size = hash_file(path)
        return path, oid, size, a + bytes(MiB) + c

    def _kill_midway(self, remote: Remote, op: str, oid: str, path: Path, size: int, tmp_path: Path) -> int:
        """Run ``op`` (``stash`` or ``fetch``) in a child process and SIGKILL it as soon as its
        progress reaches half the bytes (the child tells us through a pipe, then waits on a
        pipe we never write). Returns the child's pid (dead)."""
        sig_r, sig_w = os.pipe()
        blk_r, blk_w = os.pipe()
        spec = {
            "sys_path": sys.path, "factory": self.factory, "op": op, "oid": oid, "path": str(path),
            "size": size, "half": size // 2, "signal_fd": sig_w, "block_fd": blk_r,
            "remote": {"name": remote.name, "kind": remote.kind, "url": remote.url, "location": remote.location,
                       "tier": remote.tier, "options": dict(remote.options or {})},
        }
        errors = tmp_path / f"child-{op}.stderr"
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from jam_core.testing.backend import _child_main; "
                 "_child_main(sys.argv[1])", json.dumps(spec)],
                pass_fds=(sig_w, blk_r), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        os.close(sig_w)
        os.close(blk_r)
        try:
            signalled = os.read(sig_r, 1)
            if signalled:
                proc.kill()
            status = proc.wait()
        finally:
            os.close(sig_r)
            os.close(blk_w)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not signalled:
            if status == CHILD_DONE:
                pytest.skip(f"the backend reported no progress during a {op}: it cannot be killed mid-transfer")
            pytest.fail(f"the child {op} failed (status {status}): {errors.read_text()[-2000:]}")
        return proc.pid

    def test_killed_mid_stash(self, pm, remote, tmp_path):
        path, oid, size, data = self._sparse_file(tmp_path, 80)
        pid = self._kill_midway(remote, "stash", oid, path, size, tmp_path)
        with Session() as s:
            if pm.hook.has(remote=remote, oid=oid, size=size, session=s):  # then it must be whole
                self._assert_holds(pm, remote, data, oid, tmp_path)
        assert self._stash(pm, remote, path, oid, size) is True, "a fresh stash after the kill failed"
        self._assert_holds(pm, remote, data, oid, tmp_path)
        if self.sweeps_parts:
            left = [n for n in self._hook("list_tmp", remote) if f".{pid}." in n]
            assert left == [], f"the killed jam's part was not swept by the next stash: {left}"

    def test_killed_mid_fetch(self, pm, remote, tmp_path):
        path, oid, size, data = self._sparse_file(tmp_path, 82)
        assert self._stash(pm, remote, path, oid, size) is True
        dest = self._dest(tmp_path)
        self._kill_midway(remote, "fetch", oid, dest, size, tmp_path)
        assert os.path.getsize(dest) <= size
        self._assert_holds(pm, remote, data, oid, tmp_path)

    # -- 9. temporary names -------------------------------------------------------------------

    def test_temporary_names(self, pm, remote, tmp_path):
        mine = f".{os.getpid()}."
        before = self._hook("list_tmp", remote)
        stored = []
        for seed, size in enumerate(SIZES, start=90):
            path, oid, n = self._file(tmp_path, _bytes(size, seed))
            assert self._stash(pm, remote, path, oid, n) is True
            stored.append((oid, path, n))
        items = [self._file(tmp_path, _bytes(KiB, seed)) for seed in (95, 96)]
        with Session() as s:
            pm.hook.stash_many(remote=remote, items=[(o, p, n) for p, o, n in items], session=s)
        after = self._hook("list_tmp", remote)
        assert [n for n in after if mine in n] == [], f"parts of this process left in tmp/: {after}"
        assert self._new_tmp(remote, before) == []

        if not self.sweeps_parts:
            return
        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()
        host, _, rand, suffix = part_name().split(".")
        dead_part = ".".join([host, str(dead.pid), rand, suffix])
        keep = ["otherhost.4242.0123456789abcdef.part",  # another machine's upload, fresh
                ".".join([host, str(os.getpid()), "fedcba9876543210", suffix]),  # alive (ours)
                "notes.part", "README"]  # not jam's names at all
        for name in (dead_part, *keep):
            self._hook("put_tmp", remote, name, b"half an upload")
        path, oid, n = self._file(tmp_path, _bytes(KiB, 97))
        assert self._stash(pm, remote, path, oid, n) is True  # a new command sweeps first
        after = self._hook("list_tmp", remote)
        assert dead_part not in after, "a part of a dead jam was not swept"
        assert set(keep) <= set(after), f"a file that is not provably a stale part was removed: {after}"

    # -- 9b. list_objects ----------------------------------------------------------------------

    @staticmethod
    def _listed(pm, remote: Remote, sweep: bool = False) -> list[tuple[str, int]] | None:
        with Session() as s:
            got = pm.hook.list_objects(remote=remote, session=s, sweep=sweep)
            return None if got is None else list(got)

    def test_list_objects(self, pm, remote, tmp_path):
        """One listing says what the remote holds (doctor's check of 100,000 stubs): every
        object with its true size, nothing else under ``objects/``; only provably stale
        uploads from ``tmp/``, removed with ``sweep``; a remote gone is a RemoteError."""
        stored = {}
        for seed, size in enumerate((1, 64 * KiB, 3 * KiB), start=120):
            path, oid, n = self._file(tmp_path, _bytes(size, seed))
            assert self._stash(pm, remote, path, oid, n) is True
            stored[oid] = n
        got = self._listed(pm, remote)
        if got is None:
            pytest.skip("the backend does not implement list_objects (doctor falls back on has)")
        assert sorted(got) == sorted(stored.items()), f"list_objects answered {got!r}"
        gone = sorted(stored)[0]
        self._hook("remove_object", remote, gone)
        del stored[gone]
        assert sorted(self._listed(pm, remote)) == sorted(stored.items()), "a removed object is still listed"

        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()
        host, _, rand, suffix = part_name().split(".")
        dead_part = ".".join([host, str(dead.pid), rand, suffix])
        keep = ["otherhost.4242.0123456789abcdef.part", ".".join([host, str(os.getpid()), "fedcba9876543210", suffix]),
                "notes.part", "README"]
        for name in (dead_part, *keep):
            self._hook("put_tmp", remote, name, b"half an upload")
        got = self._listed(pm, remote)
        assert sorted(got) == sorted([*stored.items(), (f"tmp/{dead_part}", 14)]), f"list_objects answered {got!r}"
        assert dead_part in self._hook("list_tmp", remote), "listing without sweep removed a part"
        assert sorted(self._listed(pm, remote, sweep=True)) == sorted(got), "sweep did not list the removed part"
        after = self._hook("list_tmp", remote)
        assert dead_part not in after and set(keep) <= set(after), f"sweep left or removed the wrong files: {after}"
        assert sorted(self._listed(pm, remote)) == sorted(stored.items())

        self._hook("take_down", remote)
        try:
            with pytest.raises(RemoteError) as exc:
                self._listed(pm, remote)
            _one_line(exc.value, remote)
        finally:
            self.bring_back(remote)

    # -- 9c. hash_object (optional) ---------------------------------------------------------------

    def test_hash_object(self, pm, remote, tmp_path):
        """doctor --deep's read in place: an intact copy hashes to its id (a large one too,
        hashed with several threads), a corrupt one to another id, a missing one is False,
        one of another size an IntegrityError, a remote gone a RemoteError."""
        stored = {}
        for seed, size in ((130, 64 * KiB), (131, 9 * MiB)):
            path, oid, n = self._file(tmp_path, _bytes(size, seed))
            assert self._stash(pm, remote, path, oid, n) is True
            path.unlink()
            stored[oid] = n

        def ask(oid: str, size: int):
            with Session() as s:
                try:
                    return pm.hook.hash_object(remote=remote, oid=oid, size=size, session=s)
                except JamError as exc:
                    return exc

        small, big = sorted(stored, key=stored.get)
        if ask(small, stored[small]) is None:
            # Optional hook: a backend without it answers None for every object (then doctor
            # --deep fetches each object and hashes it), never a wrong "yes".
            assert all(ask(oid, n) is None for oid, n in stored.items()), "hash_object answered for some only"
            return
        for oid, n in stored.items():
            assert ask(oid, n) == oid, f"hash_object of an intact {oid} answered otherwise"
        wrong = ask(small, stored[small] + 1)
        assert isinstance(wrong, IntegrityError), f"a copy of another size answered {wrong!r}"
        _one_line(wrong, remote)
        self._hook("corrupt_object", remote, big)
        got = ask(big, stored[big])
        assert isinstance(got, str) and got != big, f"a corrupt copy answered {got!r}"
        self._hook("remove_object", remote, small)
        assert ask(small, stored[small]) is False, "a missing object was not False"
        self._hook("take_down", remote)
        try:
            gone = ask(big, stored[big])
            assert isinstance(gone, RemoteError), f"a remote gone answered {gone!r}"
            _one_line(gone, remote)
        finally:
            self.bring_back(remote)

    # -- 9d. removal, metadata files, free space (drop, move, gc, pools) ----------------------

    META = "refs/0123456789abcdef0123456789abcdef"
    HOSTILE_NAMES = ("../x", "/etc/passwd", "refs/../../x", "..", "refs/..", "refs/.", "", "REFS/x", "refs//x",
                     "refs/x/", ".hidden", "a\x00b", "refs/ x", "refs/x\n", "./refs/x")
    HOSTILE_PREFIXES = ("..", "../refs", "refs/..", "refs/../..", "./refs", "refs/ x", "a\x00b")

    def _call(self, pm, hook: str, session: Session | None = None, **kwargs):
        """Call a removal hook (in ``session``, else a new one); skip the case when no plugin
        implements it."""
        with self._session(session) as s:
            got = getattr(pm.hook, hook)(session=s, **kwargs)
        if got is None:
            pytest.skip(f"the backend does not implement {hook}")
        return got

    def _raises(self, pm, hook: str, session: Session | None = None, **kwargs) -> JamError:
        """The hook's exception (in ``session``, else a new one); fails the case if it answered."""
        with self._session(session) as s:
            try:
                got = getattr(pm.hook, hook)(session=s, **kwargs)
            except JamError as exc:
                return exc
        if got is None:
            pytest.skip(f"the backend does not implement {hook}")
        pytest.fail(f"{hook}({', '.join(f'{k}={v!r}' for k, v in kwargs.items() if k != 'data')}) "
                    f"answered {str(got)[:80]!r} instead of raising")

    def test_remove(self, pm, remote, tmp_path):
        """remove: True once gone (has/fetch then say absent), False if absent, the other objects
        untouched; a remote that is down or a location that vanished is a RemoteError, never
        "absent" (the core would take it for a copy already gone)."""
        kept_data = _bytes(KiB, 140)
        stored = [self._file(tmp_path, _bytes(64 * KiB, 141)), self._file(tmp_path, kept_data)]
        for path, oid, n in stored:
            assert self._stash(pm, remote, path, oid, n) is True
        (_, gone, n), (_, kept, _) = stored
        assert self._call(pm, "remove", remote=remote, oid=gone) is True, "remove of a held object did not answer True"
        with Session() as s:
            assert pm.hook.has(remote=remote, oid=gone, size=n, session=s) is False, "a removed object is still held"
        outcome, _ = self._fetch(pm, remote, gone, n, tmp_path)
        assert outcome is False, f"fetch of a removed object answered {outcome!r}"
        self._assert_holds(pm, remote, kept_data, kept, tmp_path)
        assert self._call(pm, "remove", remote=remote, oid=gone) is False, "a second remove did not answer False"
        _, unknown, _ = self._file(tmp_path, b"never stored")
        assert self._call(pm, "remove", remote=remote, oid=unknown) is False, "remove of an unknown id"

        self._hook("take_down", remote)
        try:
            err = self._raises(pm, "remove", remote=remote, oid=kept)
            assert isinstance(err, RemoteError), f"remove on a remote that is down raised {err!r}"
            _one_line(err, remote, named=True)
            err = self._raises(pm, "remove", remote=remote, oid=unknown)
            assert isinstance(err, RemoteError), f"remove of an absent object on a remote that is down: {err!r}"
        finally:
            self.bring_back(remote)
        self._assert_holds(pm, remote, kept_data, kept, tmp_path)

        with Session() as under_way:  # a command that was using the remote when it vanished
            assert self._call(pm, "remove", remote=remote, oid=unknown, session=under_way) is False
            self._hook("hide_location", remote)
            try:
                for s in (under_way, None):
                    for oid in (kept, unknown):
                        err = self._raises(pm, "remove", remote=remote, oid=oid, session=s)
                        assert isinstance(err, RemoteError), f"remove on a location that vanished raised {err!r}"
                        _one_line(err, remote)
                assert self._hook("location_exists", remote) is False, "remove re-created a location that vanished"
            finally:
                self.unhide_location(remote)
        self._assert_holds(pm, remote, kept_data, kept, tmp_path)

    def test_meta_round_trip(self, pm, remote, tmp_path):
        """write_meta then read_meta gives the bytes back (empty, small, several requests' worth);
        a second write replaces the first; absent is False; list_meta names what is there, []
        for a prefix with nothing; no part is left in tmp/."""
        before = self._hook("list_tmp", remote)
        name, other = self.META, "refs/fedcba9876543210fedcba9876543210.pending.0"
        assert self._call(pm, "read_meta", remote=remote, name=name) is False, "read_meta of an absent name"
        assert self._call(pm, "list_meta", remote=remote, prefix="refs") == [], "list_meta of an absent prefix"
        for data in (b"jam-refs 1\ncopies 2\n", b"", _bytes(700 * KiB, 142), b"short again\n"):
            assert self._call(pm, "write_meta", remote=remote, name=name, data=data) is True
            got = self._call(pm, "read_meta", remote=remote, name=name)
            assert isinstance(got, bytes) and _same(got, data), \
                f"read_meta gave {len(got) if isinstance(got, bytes) else got!r} back for {len(data)} bytes written"
        assert self._call(pm, "write_meta", remote=remote, name=other, data=b"x\n") is True
        assert self._call(pm, "write_meta", remote=remote, name="removing/0123456789abcdef0123456789abcdef",
                          data=b"y\n") is True
        assert self._call(pm, "list_meta", remote=remote, prefix="refs") == sorted([name, other])
        assert self._call(pm, "list_meta", remote=remote, prefix="removing") == \
            ["removing/0123456789abcdef0123456789abcdef"]
        assert self._call(pm, "list_meta", remote=remote, prefix="nothing") == []
        assert self._call(pm, "read_meta", remote=remote, name="refs/absent") is False
        assert self._call(pm, "read_meta", remote=remote, name="nothing/absent") is False
        assert self._call(pm, "read_meta", remote=remote, name=other) == b"x\n"
        assert self._new_tmp(remote, before) == [], "write_meta left a part in tmp/"

    def test_meta_replace_is_atomic(self, pm, remote, tmp_path):
        """A reader that opened the old file reads the old content whole after a replace (the
        new content went to another name and was renamed over: never written in place)."""
        old, new = _bytes(200 * KiB, 143), _bytes(100 * KiB, 144)
        assert self._call(pm, "write_meta", remote=remote, name=self.META, data=old) is True
        held = self._hook("hold_meta", remote, self.META)
        try:
            assert self._call(pm, "write_meta", remote=remote, name=self.META, data=new) is True
            assert _same(held.read(), old), "write_meta changed the file a reader had open: not an atomic replace"
        finally:
            held.close()
        assert _same(self._call(pm, "read_meta", remote=remote, name=self.META), new), "the new content is not there"

    def test_meta_failed_write_keeps_the_old(self, pm, remote, tmp_path):
        """A write that cannot finish (the disk is full) raises and leaves the old content whole."""
        old = b"jam-refs 1\ncopies 1\n" + b"b3:" + b"0" * 64 + b"\n"
        assert self._call(pm, "write_meta", remote=remote, name=self.META, data=old) is True
        before = self._hook("list_tmp", remote)
        self._hook("fill_up", remote)
        err = self._raises(pm, "write_meta", remote=remote, name=self.META, data=_bytes(BIG, 145))
        _one_line(err, remote)
        assert _same(self._call(pm, "read_meta", remote=remote, name=self.META), old), \
            "a failed write_meta damaged the old content"
        assert self._new_tmp(remote, before) == [], "a failed write_meta left its part in tmp/"

    def test_meta_hostile_names(self, pm, remote, tmp_path):
        """Names that are not ``[a-z0-9._-]`` segments (``..``, absolute, empty segments,
        control characters) are refused by every metadata hook before anything is made of them."""
        self._call(pm, "list_meta", remote=remote, prefix="refs")  # skips a backend without metadata
        before = self._hook("list_tmp", remote)
        for bad in self.HOSTILE_NAMES:
            self._raises(pm, "write_meta", remote=remote, name=bad, data=b"hostile\n")
            self._raises(pm, "read_meta", remote=remote, name=bad)
        for bad in self.HOSTILE_PREFIXES:
            self._raises(pm, "list_meta", remote=remote, prefix=bad)
        assert self._call(pm, "list_meta", remote=remote, prefix="") == [], "a hostile name made something in meta/"
        assert self._new_tmp(remote, before) == []

    def test_meta_odd_entries(self, pm, remote, tmp_path):
        """list_meta names every entry directly under meta/PREFIX, a symlink, directory or FIFO
        too (or refuses the listing as a whole): an odd entry left out would make that root's
        refs count as absent, and gc remove its only copies; nothing is listed through a
        symlinked directory. read_meta refuses a symlink, a directory, a FIFO (without hanging)
        and a file over 256 MiB, and never reads through a symlink."""
        assert self._call(pm, "write_meta", remote=remote, name=self.META, data=b"mine\n") is True
        for name, what in (("refs/link", "symlink"), ("refs/sub", "dir"), ("refs/fifo", "fifo"),
                           ("refs/huge", "huge"), ("linked", "symlink_dir")):
            self._hook("put_meta_oddity", remote, name, what)
        try:
            listed = self._call(pm, "list_meta", remote=remote, prefix="refs")
        except JamError as exc:
            _one_line(exc, remote)
        else:
            assert listed == sorted([self.META, "refs/fifo", "refs/huge", "refs/link", "refs/sub"]), \
                f"list_meta left out an entry it cannot read (its root's refs would count as absent): {listed!r}"
        try:
            linked = self._call(pm, "list_meta", remote=remote, prefix="linked")
        except JamError:
            linked = []
        assert linked == [], f"list_meta listed through a symlinked directory: {linked!r}"
        for name in ("refs/link", "refs/sub", "refs/fifo", "refs/huge"):
            err = self._raises(pm, "read_meta", remote=remote, name=name)
            _one_line(err, remote)
        try:
            through = self._call(pm, "read_meta", remote=remote, name="linked/x")
        except JamError:
            through = False
        assert through is False, "read_meta read through a symlinked directory"
        assert self._call(pm, "read_meta", remote=remote, name=self.META) == b"mine\n"

    def test_meta_remote_gone(self, pm, remote, tmp_path):
        """A remote down or a location that vanished: every metadata hook raises RemoteError
        (never "absent" or "nothing listed": the removal paths would think no root needs an
        object), and write_meta never re-creates the location."""
        assert self._call(pm, "write_meta", remote=remote, name=self.META, data=b"mine\n") is True
        with Session() as s:
            measured = pm.hook.free_space(remote=remote, session=s) is not None
        self._hook("take_down", remote)
        try:
            for hook, kw in (("read_meta", {"name": self.META}), ("read_meta", {"name": "refs/absent"}),
                             ("list_meta", {"prefix": "refs"}), ("list_meta", {"prefix": "removing"}),
                             ("write_meta", {"name": self.META, "data": b"new\n"}),
                             *((("free_space", {}),) if measured else ())):
                err = self._raises(pm, hook, remote=remote, **kw)
                assert isinstance(err, RemoteError), f"{hook} on a remote that is down raised {err!r}"
                _one_line(err, remote, named=True)
        finally:
            self.bring_back(remote)
        assert self._call(pm, "read_meta", remote=remote, name=self.META) == b"mine\n"
        with Session() as under_way:  # a command that was using the remote when it vanished
            assert self._call(pm, "read_meta", remote=remote, name=self.META, session=under_way) == b"mine\n"
            self._hook("hide_location", remote)
            try:
                for s in (under_way, None):
                    for hook, kw in (("read_meta", {"name": self.META}), ("read_meta", {"name": "refs/absent"}),
                                     ("read_meta", {"name": "nothing/absent"}), ("list_meta", {"prefix": "refs"}),
                                     ("list_meta", {"prefix": "removing"}), ("list_meta", {"prefix": "nothing"}),
                                     ("write_meta", {"name": self.META, "data": b"n"}),
                                     ("write_meta", {"name": "removing/0123456789abcdef0123456789abcdef",
                                                     "data": b"n"})):
                        err = self._raises(pm, hook, remote=remote, session=s, **kw)
                        assert isinstance(err, RemoteError), f"{hook} on a location that vanished raised {err!r}"
                        _one_line(err, remote)
                assert self._hook("location_exists", remote) is False, \
                    "write_meta re-created a location that vanished"
            finally:
                self.unhide_location(remote)
        assert self._call(pm, "read_meta", remote=remote, name=self.META) == b"mine\n"

    def test_free_space(self, pm, remote, tmp_path):
        """free_space is a whole number of bytes (or None when the backend cannot tell); a full
        remote has less than 3 MiB free; a remote that is down is a RemoteError."""
        with Session() as s:
            free = pm.hook.free_space(remote=remote, session=s)
        if free is None:
            pytest.skip("the backend does not implement free_space (or cannot tell)")
        assert isinstance(free, int) and not isinstance(free, bool) and free >= 0, f"free_space answered {free!r}"
        self._hook("fill_up", remote)
        full = self._call(pm, "free_space", remote=remote)
        assert isinstance(full, int) and full < BIG, f"free_space of a full remote answered {full!r}"

    # -- 10. remote_id ------------------------------------------------------------------------

    def test_remote_id_marker(self, pm, remote, tmp_path):
        with Session() as s:
            rid = pm.hook.remote_id(remote=remote, session=s, create=False)
            assert isinstance(rid, str) and len(rid) == 32, f"remote_id answered {rid!r}"
            assert pm.hook.remote_id(remote=remote, session=s, create=True) == rid, "a second create changed the id"
        self._hook("write_marker", remote, None)
        with Session() as s:
            assert pm.hook.remote_id(remote=remote, session=s, create=False) == ""
        with Session() as s:
            assert pm.hook.remote_id(remote=remote, session=s, create=False) == "", "create=False wrote a marker"
            new = pm.hook.remote_id(remote=remote, session=s, create=True)
            assert isinstance(new, str) and len(new) == 32 and new != rid
        with Session() as s:
            assert pm.hook.remote_id(remote=remote, session=s, create=True) == new
            assert pm.hook.remote_id(remote=remote, session=s, create=False) == new
        for garbage in (b"garbage", b'{"jam_remote":1,"id":"../../etc"}', b'{"jam_remote":2,"id":"' + b"a" * 32 + b'"}',
                        b"{" + b" " * 100_000 + b"}", b"\xff\xfe\x00"):
            self._hook("write_marker", remote, garbage)
            for create in (False, True):
                with Session() as s, pytest.raises(RemoteError) as exc:
                    pm.hook.remote_id(remote=remote, session=s, create=create)
                _one_line(exc.value, remote)

    # -- 11. /proc/self/fd paths --------------------------------------------------------------

    def test_proc_self_fd_paths(self, pm, remote, tmp_path):
        for seed, size in ((110, 64 * KiB), (111, 3 * MiB + 17)):
            data = _bytes(size, seed)
            path, oid, n = self._file(tmp_path, data)
            src = os.open(path, os.O_RDONLY)
            try:
                path.unlink()  # only the descriptor names the content now
                assert self._stash(pm, remote, Path(f"/proc/self/fd/{src}"), oid, n) is True
            finally:
                os.close(src)
            self._assert_holds(pm, remote, data, oid, tmp_path)
            with self._nameless(tmp_path) as (fd, dest):
                with Session() as s:
                    assert pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=n, session=s) is True
                assert os.fstat(fd).st_size == n and _same(os.pread(fd, n + 1, 0), data)

        items, fds = [], []
        try:
            for seed in (112, 113):
                data = _bytes(KiB, seed)
                path, oid, n = self._file(tmp_path, data)
                fds.append(os.open(path, os.O_RDONLY))
                path.unlink()
                items.append((oid, Path(f"/proc/self/fd/{fds[-1]}"), n, data))
            with Session() as s:
                out = self._many(pm.hook.stash_many(remote=remote, items=[i[:3] for i in items], session=s))
        finally:
            for fd in fds:
                os.close(fd)
        if out is not None:
            assert out == {i[0]: None for i in items}, f"stash_many answered {out!r}"
            with self._nameless(tmp_path) as (fd1, dest1), self._nameless(tmp_path) as (fd2, dest2):
                with Session() as s:
                    got = self._many(pm.hook.fetch_many(
                        remote=remote, items=[(items[0][0], dest1, KiB), (items[1][0], dest2, KiB)], session=s))
                if got is not None:
                    assert got == {items[0][0]: True, items[1][0]: True}, f"fetch_many answered {got!r}"
                    assert os.pread(fd1, 2 * KiB, 0) == items[0][3] and os.pread(fd2, 2 * KiB, 0) == items[1][3]

    @staticmethod
    @contextmanager
    def _nameless(tmp_path: Path) -> Iterator[tuple[int, Path]]:
        """A new empty file held open, named only by ``/proc/self/fd/N`` (as doctor --deep does)."""
        try:
            fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError:  # a file system without O_TMPFILE: a named file, unlinked at once
            fd, name = tempfile.mkstemp(dir=tmp_path)
            os.unlink(name)
        try:
            yield fd, Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)


def _child_main(raw: str) -> None:
    """The child of the kill-mid-transfer cases (see ``BackendConformance._kill_midway``)."""
    spec = json.loads(raw)
    sys.path[:0] = [p for p in spec["sys_path"] if p not in sys.path]
    module, _, name = spec["factory"].partition(":")
    factory = getattr(importlib.import_module(module), name)
    pm, remote = factory(Remote(**spec["remote"]))
    moved = 0
    fired = False

    def progress(n: int) -> None:
        nonlocal moved, fired
        moved += n
        if not fired and moved >= spec["half"]:
            fired = True
            os.write(spec["signal_fd"], b"!")
            os.read(spec["block_fd"], 1)  # the parent never writes: we wait here for SIGKILL

    with Session(progress=progress) as s:
        kwargs = {"remote": remote, "oid": spec["oid"], "size": spec["size"], "session": s}
        if spec["op"] == "stash":
            pm.hook.stash(source=Path(spec["path"]), **kwargs)
        else:
            pm.hook.fetch(dest=Path(spec["path"]), **kwargs)
    sys.stdout.flush()
    os._exit(CHILD_DONE)

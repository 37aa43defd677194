"""The ``sftp`` backend: objects on an SSH server, over paramiko.

URL: ``sftp://[user@]host[:port]/path`` (host may be a ``~/.ssh/config`` alias; ``/~/dir`` is
relative to the login directory). Layout on the server, as for ``dir``:
``PATH/objects/b3/ab/<hex>`` and ``PATH/tmp/`` for uploads in progress.

Options (the remote's config table): ``timeout`` (connect, seconds; default ssh_config's
ConnectTimeout or 15), ``io_timeout`` (a reply, default 60), ``connections`` (pool size,
default 4), ``verify`` (``"sent"``: hash the bytes sent, check every write's reply, fsync, check
the size; ``"read"``: also read the copy back and re-hash it), ``fsync`` (default true).

paramiko is imported only when a hook has to talk to a server: ``import jam_sftp`` is cheap.
Every hook is thread-safe: the core may call ``stash``/``fetch`` from several threads at once
and up to ``connections`` transfers then run in parallel over one pool per remote per command.

``stash_many``/``fetch_many`` (the core's batches) pipeline small objects (batch.py, the one
home of the upload and download protocols; ``stash``/``fetch`` run one object through the same
steps): dozens of files in flight per connection, their requests sent together, every reply
checked; a batch is spread over the connections of the pool that are free (parallel.py: one
shared feed of objects, one sftp-server process per connection; uploads sharded by fan-out
directory, each connection fsyncing its directories through handles it keeps open). An object of at least
``parallel.RANGE_MIN`` (64 MiB) is split in ranges over several connections (parallel.py), up
and down, with the same checks (hash of the bytes sent, every status, fsync, size, rename).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from jam_core import JamError, Remote, RemoteError, Session, UsageError, hookimpl
from jam_sftp.url import normalize, parse

if TYPE_CHECKING:
    from jam_sftp.pool import Pool

KIND = "sftp"
_cache_lock = threading.Lock()


class _Invoke:
    """Stands in for ``invoke`` in ``paramiko.config``, which uses it only to run an ssh_config
    ``Match exec`` command (``invoke.run(cmd, hide="stdout", warn=True)``): invoke is imported
    when one runs (an ImportError then if it is not installed, as paramiko raises)."""

    @staticmethod
    def run(*args, **kwargs):
        import invoke

        return invoke.run(*args, **kwargs)


def _import_paramiko() -> None:
    """Import paramiko without ``invoke``: paramiko.config imports it at once (invoke, then
    unittest.mock and asyncio: ~80 ms of paramiko's ~200 ms, on every command that talks to a
    server) for the rare ``Match exec`` line; ``_Invoke`` imports it when one is met."""
    import sys

    if "paramiko" in sys.modules:
        return
    held = "invoke" not in sys.modules
    if held:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # paramiko.config: "not installed"
    try:
        import paramiko.config
    finally:
        if held and sys.modules.get("invoke", 0) is None:
            del sys.modules["invoke"]
    if paramiko.config.invoke is None:
        paramiko.config.invoke = _Invoke()
        paramiko.config.invoke_import_error = None


@hookimpl
def parse_url(url: str) -> dict | None:
    target = parse(url)
    if target is None:
        return None
    return {"kind": KIND, "location": normalize(url, target)}


def get_pool(remote: Remote, session: Session) -> "Pool":
    """The command's connection pool for ``remote`` (created on first use, closed with the session)."""
    _import_paramiko()
    from jam_sftp.pool import Pool

    key = ("jam_sftp", remote.name, remote.location)
    with _cache_lock:
        pool = session.cache.get(key)
        if pool is None:
            target = parse(remote.location)
            if target is None:
                raise UsageError(f"remote {remote.name!r}: {remote.location!r} is not an sftp URL")
            pool = Pool(remote, target)
            session.cache[key] = pool
            session.on_close(pool.close)
    return pool


@hookimpl
def check_remote(remote: Remote, session: Session, create: bool) -> str | None:
    if remote.kind != KIND:
        return None
    return get_pool(remote, session).check(create)


@hookimpl
def remote_id(remote: Remote, session: Session, create: bool) -> str | None:
    """The identity marker at the remote's top (``LOCATION/jam-remote.json``): read with a size
    bound and validated; with ``create``, written aside and linked into place only if absent."""
    if remote.kind != KIND:
        return None
    return get_pool(remote, session).remote_id(create)


@hookimpl
def has(remote: Remote, oid: str, size: int, session: Session) -> bool | None:
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    with pool.ops() as ops:
        try:
            return ops.has(oid, size)
        except (SftpStatus, ConnectionLost, OSError) as exc:
            raise pool.error(f"look up {oid}", exc, ops) from None


@hookimpl
def hash_object(remote: Remote, oid: str, size: int, session: Session) -> str | bool | None:
    """``doctor --deep`` and a removal's count of the other copies: the object read once through
    the SFTP connection and hashed as it streams, written nowhere (``Ops.hash_object``: a
    symlink, a FIFO or anything but a regular file in its place is False, never opened)."""
    if remote.kind != KIND:
        return None
    from jam_core import is_valid_oid

    if not is_valid_oid(oid):  # refused before a path is made of it
        return False
    _import_paramiko()
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    with pool.ops() as ops:
        try:
            return ops.hash_object(oid, size, session.progress)
        except (SftpStatus, ConnectionLost, OSError, JamError) as exc:
            raise pool.error(f"read {oid}", exc, ops, size) from None


@hookimpl
def list_objects(remote: Remote, session: Session, sweep: bool):
    """Every object and its size, and the stale uploads in ``tmp/``, in one pipelined pass
    over the fan-out directories (listing.py)."""
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.listing import list_objects as listed
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    with pool.ops() as ops:
        try:
            return listed(ops, sweep)
        except (SftpStatus, ConnectionLost, OSError) as exc:
            raise pool.error("list its objects", exc, ops) from None


@hookimpl
def stash(remote: Remote, oid: str, source: Path, size: int, session: Session) -> bool | None:
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.parallel import RANGE_MIN, put_ranges
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    with pool.ops() as ops:
        try:
            pool.ensure_layout(ops)
            pool.sweep_tmp(ops)
            if size >= RANGE_MIN and pool.size > 1:
                f = put_ranges(pool, ops, oid, source, size, session.progress)
                if f.error is not None:
                    raise f.error
            else:
                ops.put(oid, source, size, session.progress)
        except (SftpStatus, ConnectionLost, OSError) as exc:
            raise pool.object_error(f"store {oid}", exc, ops, size) from None
    return True


@hookimpl
def fetch(remote: Remote, oid: str, dest: Path, size: int, session: Session) -> bool | None:
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.parallel import RANGE_MIN, get_ranges
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    with pool.ops() as ops:
        try:
            if size >= RANGE_MIN and pool.size > 1:
                return get_ranges(pool, ops, oid, Path(dest), size, session.progress)
            return ops.get(oid, dest, size, session.progress)
        except (SftpStatus, ConnectionLost, OSError) as exc:
            raise pool.error(f"fetch {oid}", exc, ops, size) from None


@hookimpl
def stash_many(remote: Remote, items, session: Session):
    """Store a batch, pipelined on one connection (see batch.py); a large object streams alone.

    Each object: ``(oid, None)`` once renamed into place after every reply was OK (written,
    fsynced, hash of the bytes sent equal to the id, its directory fsynced after the rename,
    or where the server cannot, its final name); ``(oid, IntegrityError)`` if the source no longer hashes to its id;
    ``(oid, OSError)`` if it cannot be read; ``(oid, JamError)`` if the server failed to store
    that object (a full disk: what fits is stored). A connection lost or a status the server
    refuses for the remote as a whole (permission, a missing directory) raises RemoteError for
    the batch, after the other files of the batch have finished or been cleaned up.
    """
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.parallel import RANGE_MIN, put_ranges, put_spread
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    items = list(items)
    with pool.ops() as ops:
        try:
            pool.ensure_layout(ops)
            pool.sweep_tmp(ops)
            ranged = pool.size > 1
            big = {i for i, (_, _, size) in enumerate(items) if ranged and size >= RANGE_MIN}
            rest = [i for i in range(len(items)) if i not in big]
            done = dict(zip(rest, put_spread(pool, ops, [items[i] for i in rest], session.progress), strict=True))
            for i in sorted(big):
                done[i] = put_ranges(pool, ops, *items[i], session.progress)
            files = [done[i] for i in range(len(items))]
        except (SftpStatus, ConnectionLost, OSError) as exc:
            raise pool.error(f"store {len(items)} objects", exc, ops) from None
        for f in files:
            if isinstance(f.error, SftpStatus):
                err = pool.object_error(f"store {f.oid}", f.error, ops, f.size)
                if isinstance(err, RemoteError):
                    raise err
                f.error = err  # this object's failure (a full disk): the others stand
    return [(f.oid, None if f.outcome is True and f.error is None else
             f.error if isinstance(f.error, (JamError, OSError)) else
             RemoteError(f"{pool.where}: {f.oid} was not stored")) for f in files]


@hookimpl
def fetch_many(remote: Remote, items, session: Session):
    """Fetch a batch, pipelined on one connection (see batch.py); a large object streams alone.

    Each object: ``(oid, True)`` once every read came back and the size matched (the core then
    hashes it), ``(oid, False)`` if the server has no such object, ``(oid, exception)`` for a
    damaged object (IntegrityError), a status the server refused for it, or a local write
    error. A lost connection raises RemoteError.
    """
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.parallel import RANGE_MIN, get_ranges, get_spread
    from jam_sftp.pipeline import _File
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    items = list(items)
    out = []
    with pool.ops() as ops:
        try:
            ranged = pool.size > 1
            big = {i for i, (_, _, size) in enumerate(items) if ranged and size >= RANGE_MIN}
            rest = [i for i in range(len(items)) if i not in big]
            done = dict(zip(rest, get_spread(pool, ops, [items[i] for i in rest], session.progress), strict=True))
            for i in sorted(big):
                oid, dest, size = items[i]
                f = done[i] = _File(oid, Path(dest), size)
                try:
                    f.outcome = get_ranges(pool, ops, oid, Path(dest), size, session.progress)
                except (OSError, JamError) as exc:  # a lost connection (ConnectionLost) fails the batch
                    f.fail(exc)  # this object's failure (damaged, refused, a local write error)
            files = [done[i] for i in range(len(items))]
        except (SftpStatus, ConnectionLost, OSError) as exc:
            raise pool.error(f"fetch {len(items)} objects", exc, ops) from None
        for f in files:
            if f.error is not None:
                out.append((f.oid, pool.error(f"fetch {f.oid}", f.error, ops, f.size)
                            if isinstance(f.error, SftpStatus) else f.error))
            else:
                out.append((f.oid, f.outcome is True))
    return out


# -- removal, metadata files, free space (copies, drop, move, gc; meta.py) ----------------------


def _meta(remote: Remote, session: Session, what: str, work):
    """Run ``work(Meta)`` on a borrowed connection; every failure is one RemoteError line."""
    _import_paramiko()
    from jam_sftp.meta import Meta
    from jam_sftp.transfer import ConnectionLost, SftpStatus

    pool = get_pool(remote, session)
    with pool.ops() as ops:
        try:
            return work(Meta(pool, ops))
        except (SftpStatus, ConnectionLost, OSError) as exc:
            err = pool.error(what, exc, ops)
            raise (err if isinstance(err, RemoteError) else RemoteError(str(err))) from None


@hookimpl
def remove(remote: Remote, oid: str, session: Session) -> bool | None:
    """Delete ``objects/<relpath>`` (only a regular file: a symlink there is not ours); the
    directory's fsync makes it durable. False only once the location is seen to be there."""
    if remote.kind != KIND:
        return None
    from jam_core import is_valid_oid

    if not is_valid_oid(oid):  # refused before a path is made of it
        raise RemoteError(f"remote {remote.name!r}: refused object id {str(oid)[:80]!r}")
    return _meta(remote, session, f"remove {oid}", lambda m: m.remove(oid))


@hookimpl
def write_meta(remote: Remote, name: str, data: bytes, session: Session) -> bool | None:
    """``meta/NAME`` replaced atomically: a part in tmp/, fsynced, posix-renamed over."""
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.meta import check_name

    name = check_name(remote.name, name)
    data = bytes(data)
    _meta(remote, session, f"write meta/{name}", lambda m: m.write(name, data))
    return True


@hookimpl
def read_meta(remote: Remote, name: str, session: Session) -> bytes | bool | None:
    """``meta/NAME``'s bytes (at most 64 MiB), False if absent; never through a symlink."""
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.meta import check_name

    name = check_name(remote.name, name)
    return _meta(remote, session, f"read meta/{name}", lambda m: m.read(name))


@hookimpl
def list_meta(remote: Remote, prefix: str, session: Session) -> list[str] | None:
    """Every entry of a jam name directly under ``meta/PREFIX`` (a symlink or FIFO too:
    ``read_meta`` refuses those), [] if absent."""
    if remote.kind != KIND:
        return None
    _import_paramiko()
    from jam_sftp.meta import check_name

    prefix = check_name(remote.name, (prefix or "").strip("/"), prefix=True)
    return _meta(remote, session, f"list meta/{prefix}", lambda m: m.list(prefix))


@hookimpl
def free_space(remote: Remote, session: Session) -> int | None:
    """Bytes free for the login user (``statvfs@openssh.com``); None if the server lacks it."""
    if remote.kind != KIND:
        return None
    return _meta(remote, session, "read its free space", lambda m: m.free())


__all__ = ["KIND", "RemoteError", "get_pool"]

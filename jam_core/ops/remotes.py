"""Configuring a root's remotes: add (checked once), list, remove (refused while needed)."""

from __future__ import annotations

from jam_core.errors import RemoteError, UsageError
from jam_core.model import Remote, Session
from jam_core.root import DEFAULT_REMOTE, Root, check_remote_overlaps, default_remote_location
from jam_core.units import LazyRe

__all__ = ["add_remote", "ensure_default_remote", "ensure_identity", "default_remote_location"]

_NAME = LazyRe(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_ID = LazyRe(r"\A[0-9a-f]{32}\Z")


MAX_TIER = 1000  # tiers are an order, not a measure (and TOML's integers end at 2**63)


def add_remote(root: Root, pm, name: str, url: str, tier: int = 0, options: dict | None = None,
               session: Session | None = None) -> tuple[Remote, str]:
    """Add a remote after checking it once. Returns (remote, the backend's description).

    A ``dir`` location that is, is inside or contains this root (or any registered root) is
    refused. The remote gets an identity: the backend's marker (``remote_id(create=True)``,
    an existing marker is reused) is recorded as ``id`` in the root's own config."""
    if not _NAME.match(name):
        raise UsageError(f"remote name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    if not 0 <= tier <= MAX_TIER:
        raise UsageError(f"--tier must be from 0 (the nearest) to {MAX_TIER}")
    if not url.strip():
        raise UsageError("the remote URL is empty (an unset variable?); give a path, file:///path "
                         "or sftp://[user@]host[:port]/path")
    with root.lock():
        if name in _remote_tables(root.config):
            raise UsageError(f"remote {name!r} already exists (remove it first, or pick another name)")
        parsed = pm.hook.parse_url(url=url)
        if parsed is None:
            scheme = url.split("://", 1)[0] if "://" in url else url
            raise UsageError(f"no installed plugin handles {scheme}:// remotes (see `jam plugins`)")
        if parsed["kind"] == "dir":
            check_remote_overlaps(parsed["location"], root.path)
        opts = {k: v for k, v in dict(options or {}).items() if k != "id"}
        remote = Remote(name=name, kind=parsed["kind"], url=url, location=parsed["location"], tier=tier,
                        options=opts)
        with (session or Session()) as s:
            desc = pm.hook.check_remote(remote=remote, session=s, create=True)
            if desc is None:
                raise UsageError(f"no installed plugin can check {remote.kind} remotes")
            rid = pm.hook.remote_id(remote=remote, session=s, create=True)
        if rid is not None and not (isinstance(rid, str) and _ID.match(rid)):
            raise RemoteError(f"remote {name!r} ({remote.location}): its backend gave no valid identity")
        if rid is not None:
            for other, t in _remote_tables(root.config).items():
                if isinstance(t, dict) and t.get("id") == rid:
                    raise UsageError(f"remote {name!r}: {url} is remote {other!r} already (the same store, identity "
                                     f"{rid[:8]}); a second name would count its one copy as two")
            opts["id"] = rid
            remote = Remote(name=name, kind=remote.kind, url=url, location=remote.location, tier=tier,
                            options=opts)
        table = {"kind": remote.kind, "url": url, "location": remote.location, "tier": tier} | opts
        root.update_config(lambda own: _own_remotes(root, own).__setitem__(name, table))
    return remote, desc


def _remote_tables(config: dict) -> dict:
    tables = config.get("remote", {})
    return tables if isinstance(tables, dict) else {}


def _own_remotes(root: Root, own: dict) -> dict:
    """The root's own ``[remote]`` table (created if absent)."""
    tables = own.setdefault("remote", {})
    if not isinstance(tables, dict):
        raise UsageError(f"{root.config_path}: 'remote' must be a table of remotes")
    return tables


def _user_config():
    from jam_core.root import CONFIG, user_config_dir

    return user_config_dir() / CONFIG


def ensure_default_remote(root: Root, pm) -> Remote | None:
    """With no remote configured, add the embedded default. Returns it if it was added."""
    if root.remotes():
        return None
    location = default_remote_location()
    location.mkdir(mode=0o700, parents=True, exist_ok=True)  # in a home others may enter: private
    remote, _ = add_remote(root, pm, DEFAULT_REMOTE, str(location), 0)
    return remote


# -- identity (invariant 10: an empty mount point is not the drive) ------------------------

_IDENTITY = "jam.identity"  # session.cache key prefix: remotes whose identity was checked


def ensure_identity(root: Root, remote: Remote, pm, session: Session) -> None:
    """Check, once per command, that ``remote``'s location is the remote that was added.

    Its backend's marker (``remote_id``) must carry the id recorded in the root's config.
    No marker, or another id, raises RemoteError (the drive looks unplugged, or the location
    is another directory) before anything is stored or fetched. A backend without the hook
    (``None``) is accepted. A remote added by an older jam (no recorded id) gets a marker and
    its id recorded, but only if its location already holds ``objects/``.

    The caller holds ``root.lock()`` (a non re-entrant flock): this takes no lock itself,
    although it may write the root's config.
    """
    key = (_IDENTITY, remote.name)
    if session.cache.get(key):
        return
    recorded = remote.options.get("id")
    if recorded is not None and not (isinstance(recorded, str) and _ID.match(recorded)):
        raise UsageError(f"{root.config_path}: remote {remote.name!r}: id {str(recorded)[:40]!r} is "
                         "malformed (32 hex digits expected)")
    got = pm.hook.remote_id(remote=remote, session=session, create=False)
    if got is None:  # a backend that has no identity markers
        session.cache[key] = True
        return
    where = f"remote {remote.name!r} ({remote.location})"
    missing = (f"{where}: its identity marker is missing; the drive looks unplugged or this is "
               "another directory. Nothing was stored or fetched.")
    if recorded:
        if got == "":
            raise RemoteError(missing)
        if got != recorded:
            raise RemoteError(f"{where} holds another remote's marker (id {str(got)[:32]}, not {recorded}); "
                              "the drive looks swapped or this is another directory. Nothing was stored "
                              "or fetched.")
    else:  # added by a jam without identities: adopt it, if it really is a remote already
        if not _has_objects(remote, pm, session):
            raise RemoteError(missing)
        rid = got or pm.hook.remote_id(remote=remote, session=session, create=True)
        if not (isinstance(rid, str) and _ID.match(rid)):
            raise RemoteError(f"{where}: its backend gave no valid identity")

        def record(own: dict) -> None:
            table = _own_remotes(root, own).get(remote.name)
            if isinstance(table, dict):  # a remote of the user's config is not this root's to write
                table["id"] = rid
        root.update_config(record)
    session.cache[key] = True


def _has_objects(remote: Remote, pm, session: Session) -> bool:
    """Whether the remote's location already holds jam's layout (``objects/``)."""
    if remote.kind == "dir":
        import os

        path = os.path.join(remote.location, "objects")
        return os.path.isdir(path) and not os.path.islink(path)
    try:  # other backends: check_remote without create fails when objects/ is missing
        return pm.hook.check_remote(remote=remote, session=session, create=False) is not None
    except RemoteError:
        return False

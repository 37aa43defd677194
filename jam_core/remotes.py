"""Configuring a root's remotes: add (checked once), list, remove (refused while needed)."""

from __future__ import annotations

import re

from jam_core.catalog import Catalog
from jam_core.errors import UsageError
from jam_core.model import Remote, Session
from jam_core.root import CATALOG, DEFAULT_REMOTE, Root, user_data_dir

_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def default_remote_location():
    """The embedded default: a ``dir`` remote under ``$XDG_DATA_HOME/jam/``, shared by roots."""
    return user_data_dir() / "remotes" / DEFAULT_REMOTE


def add_remote(root: Root, pm, name: str, url: str, tier: int = 0, options: dict | None = None,
               session: Session | None = None) -> tuple[Remote, str]:
    """Add a remote after checking it once. Returns (remote, the backend's description)."""
    if not _NAME.match(name):
        raise UsageError(f"remote name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    if tier < 0:
        raise UsageError("--tier must be 0 or more (0 = nearest)")
    with root.lock():
        config = root.config
        if name in config.get("remote", {}):
            raise UsageError(f"remote {name!r} already exists (remove it first, or pick another name)")
        parsed = pm.hook.parse_url(url=url)
        if parsed is None:
            scheme = url.split("://", 1)[0] if "://" in url else url
            raise UsageError(f"no installed plugin handles {scheme}:// remotes (see `jam plugins`)")
        remote = Remote(name=name, kind=parsed["kind"], url=url, location=parsed["location"], tier=tier,
                        options=dict(options or {}))
        with (session or Session()) as s:
            desc = pm.hook.check_remote(remote=remote, session=s, create=True)
        if desc is None:
            raise UsageError(f"no installed plugin can check {remote.kind} remotes")
        table = {"kind": remote.kind, "url": url, "location": remote.location, "tier": tier} | dict(options or {})
        config.setdefault("remote", {})[name] = table
        root.write_config(config)
    return remote, desc


def remove_remote(root: Root, name: str, force: bool = False) -> None:
    with root.lock():
        config = root.config
        if name not in config.get("remote", {}):
            raise UsageError(f"no remote named {name!r}")
        with Catalog(root.jam_dir / CATALOG) as cat:
            only = cat.objects_only_on(name)
        if only and not force:
            raise UsageError(
                f"remote {name!r} holds the only copy of {only} stubbed file(s); "
                "check them out first (or --force to forget the remote anyway)"
            )
        del config["remote"][name]
        root.write_config(config)


def ensure_default_remote(root: Root, pm) -> Remote | None:
    """With no remote configured, add the embedded default. Returns it if it was added."""
    if root.remotes():
        return None
    location = default_remote_location()
    location.mkdir(parents=True, exist_ok=True)
    remote, _ = add_remote(root, pm, DEFAULT_REMOTE, str(location), 0)
    return remote

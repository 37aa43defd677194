"""``sftp://[user@]host[:port]/path`` URLs. No paramiko here: parsing runs at ``jam remote add``.

The path is absolute on the server (``sftp://host/srv/jam`` is ``/srv/jam``), as in git and
curl. ``sftp://host/~/jam`` means ``jam`` in the login directory (git-annex and curl spell it
so; rclone's bare ``host:jam`` means the same); ``sftp://host/~`` is the login directory itself.
The host may be an alias from ``~/.ssh/config``; user and port given in the URL win over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from jam_core import UsageError

SCHEME = "sftp"


@dataclass(frozen=True)
class Target:
    """Where a remote lives, as the URL says (ssh_config may fill in the rest)."""

    host: str
    user: str | None
    port: int | None
    path: str  # absolute ("/srv/jam") or relative to the login directory ("jam", ".")

    def display(self) -> str:
        """``user@host:port/path`` for messages, with only the parts the URL gave."""
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        path = self.path if self.path.startswith("/") else f"/~/{self.path}".rstrip("/.")
        return f"{who}{host}{port}{path}"


def parse(url: str) -> Target | None:
    """Parse an sftp URL; ``None`` for other schemes; :class:`UsageError` when malformed."""
    if not isinstance(url, str) or "://" not in url:
        return None
    scheme = url.split("://", 1)[0].lower()
    if scheme != SCHEME:
        return None
    hint = "expected sftp://[user@]host[:port]/path"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"bad sftp URL {url!r}: {exc}; {hint}") from None
    if parts.password is not None:
        raise UsageError(
            f"sftp URL {url!r} contains a password; jam never stores passwords: "
            "use a key, the ssh agent or ~/.ssh/config"
        )
    if parts.query or parts.fragment:
        raise UsageError(f"bad sftp URL {url!r}: unexpected '?' or '#' part; {hint}")
    host = parts.hostname
    if not host:
        raise UsageError(f"bad sftp URL {url!r}: no host; {hint}")
    if port == 0:
        raise UsageError(f"bad sftp URL {url!r}: port 0; {hint}")
    user = unquote(parts.username) if parts.username else None
    raw = unquote(parts.path)
    if raw in ("", "/"):
        if raw == "":
            raise UsageError(f"bad sftp URL {url!r}: no path; {hint} (use /~/DIR for a directory in your home)")
        path = "/"
    elif raw == "/~" or raw == "/~/":
        path = "."
    elif raw.startswith("/~/"):
        path = raw[3:].rstrip("/") or "."
    elif raw.startswith("/~"):
        raise UsageError(f"bad sftp URL {url!r}: ~user paths are not supported; use the absolute path")
    else:
        path = raw.rstrip("/") or "/"
    if "\0" in path or any(p == ".." for p in path.split("/")):
        raise UsageError(f"bad sftp URL {url!r}: the path may not contain '..' or NUL")
    return Target(host=host, user=user, port=port, path=path)


def normalize(url: str, target: Target) -> str:
    """The URL as jam records it: scheme lower-case, no trailing slash."""
    rest = url.split("://", 1)[1].rstrip("/")
    if target.path == "/":
        rest += "/"
    return f"{SCHEME}://{rest}"

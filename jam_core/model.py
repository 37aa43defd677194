"""Plain records passed between the core and plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Remote:
    """A named place for objects.

    ``kind`` picks the backend (``dir``, ``sftp``...), ``location`` is what that backend needs
    to find it (a directory for ``dir``, the URL for ``sftp``), ``tier`` orders remotes
    (0 = nearest). ``options`` holds the rest of the remote's config table.
    """

    name: str
    kind: str
    url: str
    location: str
    tier: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What a policy sees of one file: no I/O needed to decide.

    ``path`` is relative to the root (``str``, undecodable bytes kept as surrogate escapes),
    ``last_used`` is the newest of atime, mtime and jam's own record of use (epoch seconds),
    ``state`` is ``local``, ``stub`` or ``dirty``.
    """

    path: str
    size: int
    mtime: float
    atime: float
    last_used: float
    state: str = "local"
    pinned: bool = False
    nlink: int = 1


@dataclass(frozen=True, slots=True)
class Nomination:
    """A policy's choice of one file, with the reason a person can read."""

    path: str
    policy: str
    reason: str


class Session:
    """State that lives for one command: backends keep connections here.

    ``cache`` is a dict a backend may use (keyed by something of its own, e.g. the remote
    name); ``on_close`` registers cleanup that runs when the command ends. ``progress`` is
    called with a byte count as content moves (a no-op when nothing is shown).
    """

    def __init__(self, progress: Callable[[int], None] | None = None):
        self.cache: dict[Any, Any] = {}
        self.progress: Callable[[int], None] = progress or (lambda n: None)
        self._closers: list[Callable[[], None]] = []

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:  # cleanup must not hide the command's own result
                pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""``[hook]`` in a root's config.toml: how deep a visit fetches, how much at most, and whether
in the background."""

from __future__ import annotations

from jam_core.errors import UsageError
from jam_core.root import Root
from jam_core.units import parse_size

DEFAULT_DEPTH = 0
DEFAULT_MAX_FETCH = "1GB"


class HookSettings:
    """``[hook]`` in a root's config.toml. ``depth`` None means unlimited. A plain class (no
    dataclass: its decoration costs the cd hook's fetch time for nothing)."""

    __slots__ = ("depth", "max_fetch", "background")

    def __init__(self, depth: int | None = DEFAULT_DEPTH, max_fetch: int = parse_size(DEFAULT_MAX_FETCH),
                 background: bool = False):
        self.depth = depth
        self.max_fetch = max_fetch
        self.background = background

    def _key(self) -> tuple:
        return (self.depth, self.max_fetch, self.background)

    def __eq__(self, other) -> bool:
        return type(other) is HookSettings and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"HookSettings(depth={self.depth!r}, max_fetch={self.max_fetch!r}, background={self.background!r})"


def settings(root: Root) -> HookSettings:
    """The root's ``[hook]`` table, validated (UsageError names the bad key)."""
    table = root.config.get("hook", {})
    where = f"{root.config_path}: [hook]"
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table")
    depth = table.get("depth", DEFAULT_DEPTH)
    if depth in ("all", -1):
        depth = None
    elif not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise UsageError(f"{where} depth: expected a whole number >= 0 or \"all\", got {depth!r}")
    max_fetch = parse_size(table.get("max_fetch", DEFAULT_MAX_FETCH), f"{where} max_fetch")
    background = table.get("background", False)
    if not isinstance(background, bool):
        raise UsageError(f"{where} background: expected true or false, got {background!r}")
    return HookSettings(depth, max_fetch, background)

"""``[hook]`` in a root's config.toml: how deep a visit fetches, how much at most, and whether
in the background."""

from __future__ import annotations

from dataclasses import dataclass

from jam_core.errors import UsageError
from jam_core.root import Root
from jam_core.units import parse_size

DEFAULT_DEPTH = 0
DEFAULT_MAX_FETCH = "1GB"


@dataclass(frozen=True)
class HookSettings:
    """``[hook]`` in a root's config.toml. ``depth`` None means unlimited."""

    depth: int | None = DEFAULT_DEPTH
    max_fetch: int = parse_size(DEFAULT_MAX_FETCH)
    background: bool = False


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

"""Values as people write them and read them: sizes, durations, percentages (nothing heavy:
the CLI loads this at start-up)."""

from __future__ import annotations

import re

from jam_core.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class LazyRe:
    """A regular expression compiled when first used: ``_ID = LazyRe(r"\\A[0-9a-f]{32}\\Z")`` at
    module level, then ``_ID.match(s)`` as with ``re.compile``'s pattern. Compiling one costs
    ~0.4 M instructions, paid at import by every command (the cd hook's fetch compiled 15
    that it mostly never used); here only by the one that matches. The first use puts the
    compiled pattern's attribute (a bound method) on this object, so every later call goes
    straight to it. The one home of this for jam_core and the plugins."""

    def __init__(self, pattern: str | bytes, flags: int = 0):
        self._args = (pattern, flags)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)  # copy/pickle probing: no compile for that
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            compiled = self._compiled = re.compile(*self._args)
        value = getattr(compiled, name)
        setattr(self, name, value)
        return value

    def __repr__(self) -> str:
        return f"LazyRe({self._args[0]!r})"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}
_SIZE_LIMIT = 2**63  # no file or disk is that big (and an off_t holds less)


def parse_size(value: Any, what: str = "size") -> int:
    """``"64KiB"``, ``"20GB"``, ``"1.5 G"``, ``4096`` -> bytes. Raises UsageError for nonsense."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a size like 64KiB or 20GB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what}: a size cannot be negative ({value})")
        if value >= _SIZE_LIMIT:
            raise UsageError(f"{what}: {value} is more than any disk holds")
        return value
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    try:
        n = float(num)
    except ValueError:
        n = -1.0
    if unit not in _UNITS or n < 0 or n != n or n == float("inf"):
        raise UsageError(f"{what}: expected a size like 64KiB or 20GB, got {value!r}")
    try:
        size = int(n * _UNITS[unit])
    except OverflowError:  # "1e300GB": the product is inf
        size = _SIZE_LIMIT
    if size >= _SIZE_LIMIT:
        raise UsageError(f"{what}: {value!r} is more than any disk holds")
    return size


def human(n: float, trim: bool = False) -> str:
    """Bytes in the units ``parse_size`` reads (1 GB = 10^9 B): ``"24.1 GB"``; ``trim`` drops
    a ``.0`` so a size read from the config reads back as written (``"20 GB"``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{n:.0f} B"
            text = f"{n:.1f} {unit}"
            return text.replace(".0 ", " ") if trim else text
        n /= 1000
    return f"{n} B"


_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 7 * 86400, "week": 7 * 86400, "weeks": 7 * 86400,
    "y": 365 * 86400, "year": 365 * 86400, "years": 365 * 86400,
}
_DURATION_RE = LazyRe(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_PERCENT_RE = LazyRe(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_duration(value: Any, what: str = "duration") -> float:
    """``"90s"``, ``"10m"``, ``"12h"``, ``"30d"``, ``"2w"``, ``"1y"`` -> seconds.

    A bare number is refused: ``30`` could mean seconds or days. Raises UsageError."""
    hint = f"{what}: expected a duration like 10m, 12h, 30d, 2w or 1y, got {value!r}"
    if not isinstance(value, str):
        raise UsageError(hint)
    m = _DURATION_RE.match(value.lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise UsageError(hint)
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds == float("inf"):  # "999...9d": more digits than a float holds
        raise UsageError(f"{what}: {value!r} is longer than any clock counts")
    return seconds


def parse_percent(value: Any, what: str = "percentage") -> float:
    """``"25%"`` -> 0.25 (0% to 100%). Raises UsageError."""
    m = _PERCENT_RE.match(value) if isinstance(value, str) else None
    share = float(m.group(1)) / 100 if m else -1.0
    if not 0 <= share <= 1:
        raise UsageError(f"{what}: expected a percentage from 0% to 100% like \"25%\", got {value!r}")
    return share


def format_duration(seconds: float) -> str:
    for unit, n in (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"

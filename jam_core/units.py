"""Sizes as people write them and read them (nothing heavy: the CLI loads this at start-up)."""

from __future__ import annotations

from typing import Any

from jam_core.errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(value: Any, what: str = "size") -> int:
    """``"64KiB"``, ``"20GB"``, ``"1.5 G"``, ``4096`` -> bytes. Raises UsageError for nonsense."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a size like 64KiB or 20GB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what}: a size cannot be negative ({value})")
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
    return int(n * _UNITS[unit])


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

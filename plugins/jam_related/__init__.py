"""The ``related`` policy: what ``jam checkout --related FILE`` brings along with FILE.

    [related]
    same_dir = true      # only stubs in FILE's directory (false: anywhere in the root)
    extensions = true    # ...with FILE's extension (photo.jpg -> other *.jpg)
    stem = true          # ...or FILE's name stem (photo.jpg -> photo.xmp, photo.raw)
    max_files = 20       # at most this many, most recently used first (0: no limit)

A stub is related when it matches any enabled criterion (extension or stem); with both
switched off, every stub in scope is. Runs only for purpose ``fetch``.
"""

from __future__ import annotations

import posixpath
from typing import Any, Mapping, Sequence

from jam_core import FETCH, FileRecord, Nomination, UsageError, hookimpl

NAME = "related"
DEFAULTS = {"same_dir": True, "extensions": True, "stem": True, "max_files": 20}


def split_name(path: str) -> tuple[str, str, str]:
    """(directory, stem, extension): ``a/photo.tar.gz`` -> ``("a", "photo", ".gz")``.

    The stem is the name up to its first dot (a leading dot belongs to the name)."""
    d, name = posixpath.split(path)
    body = name[1:] if name.startswith(".") else name
    stem = name[: len(name) - len(body)] + body.split(".", 1)[0]
    ext = posixpath.splitext(name)[1].lower() if "." in body else ""
    return d, stem, ext


def select_related(records: Sequence[FileRecord], anchors: Sequence[str], same_dir: bool = True,
                   extensions: bool = True, stem: bool = True, max_files: int = 20) -> list[Nomination]:
    """Stubs related to any anchor, the most recently used first, at most ``max_files``."""
    keys = [(a, *split_name(a)) for a in anchors]
    anchor_set = set(anchors)
    found: list[tuple[FileRecord, str]] = []
    for r in records:
        if r.path in anchor_set:
            continue
        d, s, e = split_name(r.path)
        for a, ad, as_, ae in keys:
            if same_dir and d != ad:
                continue
            why = []
            if extensions and e and e == ae:
                why.append("extension")
            if stem and s == as_:
                why.append("name stem")
            if not extensions and not stem:
                why.append("directory" if same_dir else "root")
            if why:
                found.append((r, f"same {' and '.join(why)} as {a}"))
                break
    found.sort(key=lambda fr: (-fr[0].last_used, fr[0].path))
    if max_files:
        found = found[:max_files]
    return [Nomination(r.path, NAME, why) for r, why in found]


def settings(config: Mapping[str, Any]) -> dict:
    table = config.get("related", {})
    if not isinstance(table, Mapping):
        raise UsageError(f"related: expected a table ([related]), got {table!r}")
    out = dict(DEFAULTS)
    for key, value in table.items():
        if key not in DEFAULTS:
            raise UsageError(f"related: unknown setting {key!r} (known: {', '.join(DEFAULTS)})")
        if key == "max_files":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"related.max_files: expected a whole number >= 0, got {value!r}")
        elif not isinstance(value, bool):
            raise UsageError(f"related.{key}: expected true or false, got {value!r}")
        out[key] = value
    return out


@hookimpl
def select(records, purpose, anchors, config):
    if purpose != FETCH or not anchors:
        return None
    return select_related(records, anchors, **settings(config))

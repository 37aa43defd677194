"""Visits the cd hooks record without starting a process: ``ROOT/.jam/visits/``.

On every ``cd`` into a directory of a root (``JAM_DISABLE`` unset), the hook truncates or
creates an empty file in ``ROOT/.jam/visits/`` named after the directory, whose mtime is then
the time of the visit: ``: >|"$marks/$name"`` in bash and zsh, ``true >$marks/$name`` in fish.
A builtin redirection starts no process and needs no clock in the shell (fish has none); the
filesystem dates the visit to the nanosecond. It is bounded by design: one empty file per
directory visited since the last fold, however often it was visited.

A mark's name is the directory's path from the root with a leading ``/`` (the root itself is
``/``), percent-encoded: bash and zsh write ``%`` as ``%25`` and ``/`` as ``%2F`` and leave every
other byte as it is (newlines and non-UTF-8 bytes included: a file name can hold them); fish
writes ``string escape --style=url`` and then ``/`` as ``%2F``. One percent-decoding reads both
back exactly. A name longer than NAME_MAX (255 bytes) cannot be created, so a visit to such a
deep directory is not recorded by the shell (``jam hook-fetch`` still records its own visits).

:func:`fold` turns the marks into the catalog's ``uses``: each visited directory's files
(within ``hook.depth``, the scope a fetch on that visit would have) count as used at the mark's
mtime, never moving a newer use back. It runs under the root's lock when policies plan and on
``jam hook-fetch``. Marks are metadata, so input: a name that does not decode to a directory
inside the root (``..``, ``.jam``, a symlink leading out, junk), a mark that is not a regular
file, or a time more than a day ahead is dropped without effect.
"""

from __future__ import annotations

import os
import re
import stat
import time
from urllib.parse import unquote_to_bytes

from jam_core.root import CATALOG, JAM_DIR, Root

MARKS = "visits"
FOLDING = "visits.folding"  # marks being folded (moved here first, so no visit is lost)
AHEAD = 86400  # a mark dated further ahead than this is junk, not a visit
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def marks_dir(root: Root) -> str:
    return os.path.join(root.path, JAM_DIR, MARKS)


def ensure(root: Root) -> None:
    """Create ``ROOT/.jam/visits/`` (the hooks write marks only where it exists)."""
    try:
        os.mkdir(marks_dir(root), 0o755)
    except OSError:
        pass  # it exists, or the root is read-only: no marks then


def encode(rel: str) -> bytes:
    """The mark name the bash and zsh hooks write for ``rel`` ("." is the root)."""
    raw = b"/" if rel == "." else b"/" + os.fsencode(rel)
    return raw.replace(b"%", b"%25").replace(b"/", b"%2F")


def decode(name: bytes) -> str | None:
    """The relative path ("." for the root) a mark's name stands for, or None for junk."""
    if not name.startswith(b"%2F") or _BAD_ESCAPE.search(name):
        return None
    raw = unquote_to_bytes(name)
    if b"\0" in raw:
        return None
    parts = raw[1:].split(b"/") if raw != b"/" else []
    if any(p in (b"", b".", b"..") for p in parts) or parts[:1] == [JAM_DIR.encode()]:
        return None
    return os.fsdecode(b"/".join(parts)) if parts else "."


def _resolve(root: Root, rel: str) -> str | None:
    """``rel`` as a real directory of the root (symlinks resolved), or None if it leads out,
    into ``.jam`` or nowhere."""
    top = os.path.realpath(root.path)
    real = os.path.realpath(root.abs(rel))
    if real != top and not real.startswith(top.rstrip("/") + "/"):
        return None
    out = os.path.relpath(real, top)
    if out.split("/", 1)[0] == JAM_DIR or not os.path.isdir(real):
        return None
    return out


def pending(root: Root) -> bool:
    """True if there are marks to fold (one scandir; no lock)."""
    for d in (marks_dir(root), os.path.join(root.path, JAM_DIR, FOLDING)):
        try:
            with os.scandir(d) as it:
                if next(it, None) is not None:
                    return True
        except OSError:
            pass
    return False


def fold(root: Root, now: float | None = None) -> int:
    """Fold the marks into the catalog's uses and remove them; returns the number of
    directories recorded. Takes the root's lock without waiting: when another jam holds it,
    or the root is read-only, the marks stay for the next fold."""
    from jam_core.errors import UsageError

    ensure(root)
    if not pending(root):
        return 0
    try:
        with root.lock(wait=False):
            return _fold(root, time.time() if now is None else now)
    except (UsageError, OSError):
        return 0


def _fold(root: Root, now: float) -> int:
    from jam_core.catalog import Catalog
    from jam_core.errors import UsageError
    from jam_core.stubdirs import HookSettings, settings
    from jam_core.visit import plan

    marks = os.fsencode(marks_dir(root))
    folding = os.fsencode(os.path.join(root.path, JAM_DIR, FOLDING))
    try:
        os.mkdir(folding, 0o700)
    except FileExistsError:
        pass
    # Move each mark aside, then read its time: a shell that opened it before the move has
    # already dated it; one that comes after makes a new mark for the next fold.
    try:
        names = os.listdir(marks)
    except OSError:
        names = []
    for name in names:
        try:
            os.rename(os.path.join(marks, name), os.path.join(folding, name))
        except OSError:
            pass
    visits: dict[str, float] = {}
    with os.scandir(folding) as it:
        entries = list(it)
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        rel = decode(e.name)
        if rel is not None and stat.S_ISREG(st.st_mode) and 0 < st.st_mtime <= now + AHEAD:
            rel = _resolve(root, rel)
            if rel is not None:
                visits[rel] = max(visits.get(rel, 0.0), st.st_mtime)
        _remove(e.path, st)
    try:
        os.rmdir(folding)
    except OSError:
        pass
    if not visits:
        return 0
    try:
        hs = settings(root)
    except UsageError:
        hs = HookSettings()
    with Catalog(root.jam_dir / CATALOG) as cat, cat.transaction():
        for rel, when in sorted(visits.items()):
            cat.record_use(plan(root, rel, hs).files, when)
    return len(visits)


def _remove(path: bytes, st: os.stat_result) -> None:
    try:
        if stat.S_ISDIR(st.st_mode):
            import shutil

            shutil.rmtree(path)  # junk; rmtree never follows a symlink out
        else:
            os.unlink(path)
    except OSError:
        pass

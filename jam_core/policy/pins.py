"""Pins: files and directories that policies never stash, kept in ``ROOT/.jam/pins``.

The catalog is an index that ``jam doctor --fix`` may rebuild from the tree, so pins do not
live there: they live in a small text file beside the config, one pin per line, each line a
JSON string of the path relative to the root (``"photos/2024"``; ``"."`` pins the whole root).
JSON escapes keep any name on one line: a newline is ``\\n``, a byte that is not UTF-8 is the
surrogate escape ``\\udcXX`` (Python's ``surrogateescape``), so every file name survives.
Blank lines and lines starting with ``#`` are ignored. The file is rewritten atomically
(a temporary file, fsync, rename, fsync of ``.jam``), under the root's lock.

Every pin read back is checked like other metadata: relative, normalised, no ``..`` and
nothing inside ``.jam``; a file that breaks these rules is refused with its line number
rather than half-read (a pin that silently vanished would let a policy stash the file).

Pins written by older versions sit in the catalog's ``pins`` table; the first reader that
finds no pins file copies them into it. From then on the file is the truth; ``add_pins`` and
``remove_pins`` keep the table a copy of it for readers that still look there, and a row the
file does not hold is never honoured.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Sequence

from jam_core.errors import UsageError
from jam_core.root import CATALOG, Root, check_rel

PINS = "pins"
MAX_BYTES = 16 << 20  # a pins file bigger than this is not one jam wrote
HEADER = "# jam pins: one JSON string per line, a path relative to the root (\".\" = all of it)\n"


def covered(rel: str, pins: set[str] | frozenset[str]) -> bool:
    """True if ``rel`` or a directory above it is pinned (``.`` pins the whole root)."""
    if not pins:
        return False
    if "." in pins:
        return True
    p = rel
    while p:
        if p in pins:
            return True
        p = p.rpartition("/")[0]
    return False


def check_pin(rel: object) -> str:
    """``rel`` if it is a valid pin (a normalised relative path, not in ``.jam``), else ValueError."""
    return check_rel(rel)


def pins_path(root: Root) -> str:
    return os.path.join(root.jam_dir, PINS)


def _read_file(root: Root) -> set[str] | None:
    """The pins in the file, or None when there is no file. UsageError for a bad file."""
    path = pins_path(root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the pins: {exc.strerror} "
                         "(it must be a regular file jam wrote)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: not a regular file; move it away (jam keeps the pins there)")
        if st.st_size > MAX_BYTES:
            raise UsageError(f"{path}: {st.st_size} bytes is too big for a pins file; check it")
        chunks = []
        left = MAX_BYTES + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path}: too big for a pins file; check it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text (jam writes every pin as a JSON string); "
                         "fix or remove it") from None
    out: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.add(check_pin(json.loads(line)))
        except (ValueError, RecursionError) as exc:
            why = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not a JSON string"
            raise UsageError(f"{path}, line {n}: not a valid pin ({why}); fix or remove that line") from None
    return out


def _encode(pins: Iterable[str]) -> bytes:
    lines = [HEADER] + [json.dumps(p, ensure_ascii=True) + "\n" for p in sorted(pins)]
    return "".join(lines).encode("ascii")


def _write(root: Root, pins: Iterable[str], exclusive: bool = False) -> bool:
    """Write the pins file atomically. ``exclusive``: only if there is none yet (returns False
    if one appeared meanwhile). A temporary file jam made is removed on any failure."""
    final = pins_path(root)
    tmp = os.path.join(root.jam_dir, f".{PINS}.{os.getpid()}.tmp")
    data = _encode(pins)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, final)  # fails if a pins file exists: never over someone's pins
            except FileExistsError:
                return False
        else:
            os.rename(tmp, final)
        dfd = os.open(root.jam_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _catalog_pins(root: Root) -> set[str] | None:
    """The pins table of the catalog (older versions kept pins there), or None if unreadable."""
    db = root.jam_dir / CATALOG
    if not db.is_file():
        return set()
    import sqlite3

    from jam_core.catalog import Catalog

    try:
        with Catalog(db) as cat:
            return cat.pins()
    except sqlite3.Error:
        return None


def _mirror(root: Root, pins: set[str]) -> None:
    """Copy the pins into the catalog's table, for readers that still look there (``jam
    status``). The file stays the truth: a row the file does not hold is never honoured."""
    db = root.jam_dir / CATALOG
    if not db.is_file():
        return
    import sqlite3

    from jam_core.catalog import Catalog

    try:
        with Catalog(db) as cat:
            rows = cat.pins()
            if rows - pins:
                cat.unpin(sorted(rows - pins))
            if pins - rows:
                cat.pin(sorted(pins - rows))
    except sqlite3.Error:
        pass  # a damaged catalog is doctor's to rebuild; the pins file holds the pins


def _migrate(root: Root) -> set[str]:
    """Move the catalog's pins (older versions kept them there) into a new pins file."""
    raw = _catalog_pins(root)
    if raw is None:
        return set()  # an unreadable catalog: no file yet, try again once it is repaired
    legacy = set()
    for rel in raw:
        try:
            legacy.add(check_pin(rel))
        except ValueError:
            continue  # a hostile row is not a pin
    try:
        created = _write(root, legacy, exclusive=True)
    except OSError:
        return legacy  # a read-only .jam: honour them without moving them
    if not created:  # another jam wrote the file meanwhile: it is the truth
        found = _read_file(root)
        return found if found is not None else legacy
    return legacy


def read_pins(root: Root) -> set[str]:
    """The root's pins (paths relative to the root). UsageError if the pins file is unusable."""
    found = _read_file(root)
    if found is None:
        return _migrate(root)
    return found


def add_pins(root: Root, rels: Iterable[str]) -> set[str]:
    """Add pins (call under the root's lock). Returns the pins now."""
    pins = read_pins(root)
    new = set()
    for r in rels:
        try:
            new.add(check_pin(r))
        except ValueError as exc:
            raise UsageError(f"cannot pin {r!r}: {exc}") from None
    if not new <= pins:
        pins |= new
        _write(root, pins)
        _mirror(root, pins)
    return pins


def remove_pins(root: Root, rels: Iterable[str]) -> tuple[set[str], set[str]]:
    """Remove pins (call under the root's lock). Returns (pins before, pins now)."""
    before = read_pins(root)
    after = before - set(rels)
    if after != before:
        _write(root, after)
        _mirror(root, after)
    return before, after


# -- the operations behind `jam pin` and `jam unpin` ----------------------------------------------

def pins(root: Root) -> list[str]:
    """The root's pins, sorted."""
    return sorted(read_pins(root))


def pin(root: Root, rels: Sequence[str]) -> None:
    """Pin files or directories (relative to the root): policies never stash them. The caller
    checks pinned stubs out (``jam pin`` does, like "always keep on this device"). Pins live
    in ``ROOT/.jam/pins`` (jam_core.policy.pins), so a rebuilt catalog keeps them."""
    for rel in rels:
        if not os.path.lexists(root.abs(rel)):
            raise UsageError(f"{rel}: no such file or directory")
    with root.lock():
        add_pins(root, rels)


def unpin(root: Root, rels: Sequence[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Unpin; returns (unpinned, not pinned, [(still covered, by which pin)])."""
    with root.lock():
        before, left = remove_pins(root, rels)
    held = []
    for rel in rels:
        if covered(rel, left):
            held.append((rel, next(p for p in sorted(left, key=len, reverse=True) if covered(rel, {p}))))
    return [r for r in rels if r in before], [r for r in rels if r not in before], held

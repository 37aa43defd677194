"""The snapshot format: what a tree was at one moment, as an immutable object.

Canonical text (UTF-8, ``\\n`` after every line)::

    jam-snapshot 1
    {"machine":{"host":"laptop","id":"<machine id>"},"message":"…","parent_sizes":[4711],
     "parents":["b3:…"],"pins":["docs"],"time":1764576000000000000,"tree":"photos"}
    ["f","a/b.txt","b3:<64 hex>",1234,420,1764575000123456789]
    ["l","a/link","../target",1764575000123456789]

Line 2 is one JSON object (keys sorted, no spaces, ASCII): ``parents`` (snapshot ids, none for
the first) and ``parent_sizes`` (their stored sizes: a backend fetches an object by id and exact
size, so a reader can walk the history from a head alone), ``time`` (UTC, ns since the epoch),
``machine`` (host name and the stable machine id), ``tree`` (``[history] name``), ``message``,
``pins``. Then one JSON array per entry, sorted by path (Python's str order, each path once):
``f`` a regular file (path, object id, size, mode bits, mtime_ns), ``l`` a symlink (path,
target, mtime_ns). Names that are not UTF-8 are kept as surrogate escapes (``\\udcXX`` in
JSON), so every name round-trips. Directories are implied.

Stored bytes = ``zlib.compress(text)``; the snapshot's id = ``b3:`` of the stored bytes, so a
backend verifies it as any object. ``parse`` is validation (invariant 7): a snapshot from a
remote is input, and a hostile one is refused with one line (``SnapshotError``).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field

from jam_core.errors import JamError, UsageError
from jam_core.objects import is_valid_oid
from jam_core.root import check_rel

MAGIC = b"jam-snapshot 1\n"
MAX_TEXT = 256 << 20  # 256 MiB of text (about 2 million entries): anything larger is refused
MAX_SIZE = 1 << 50  # as stub.MAX_SIZE
MAX_TOTAL = 1 << 62  # all of a snapshot's files together (the history index keeps the sum as an integer)
MAX_MESSAGE = 64 << 10
MAX_PARENTS = 64
# The latest time a snapshot may have (ns; 2261-09): below the largest SQLite INTEGER by room
# for its descendants, each later than its parents. A head dated at the end of time could
# have no merge nor commit after it (every sync an error, after its merge changed the tree).
MAX_TIME = (1 << 63) - 1 - (1 << 54)
_TREE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,63}\Z")
_MACHINE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,63}\Z")
FILE, LINK = "f", "l"


class SnapshotError(JamError):
    """A snapshot that cannot be trusted (malformed, hostile, from a newer jam)."""

    exit_code = 1


@dataclass(slots=True)
class Item:
    """One entry: a regular file (``kind`` f: oid, size, mode) or a symlink (l: target)."""

    path: str
    kind: str
    oid: str = ""
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    target: str = ""

    def same(self, other: "Item") -> bool:
        """Same content and metadata that a restore brings back (kind, id, size, mode, target)."""
        return (self.kind, self.oid, self.size, self.mode, self.target) == \
            (other.kind, other.oid, other.size, other.mode, other.target)

    def row(self) -> list:
        if self.kind == FILE:
            return [FILE, self.path, self.oid, self.size, self.mode, self.mtime_ns]
        return [LINK, self.path, self.target, self.mtime_ns]


@dataclass
class Snapshot:
    parents: list[str]
    time_ns: int
    host: str
    machine: str
    tree: str
    message: str = ""
    pins: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)  # sorted by path
    id: str = ""  # set by encode/parse
    parent_sizes: list[int] = field(default_factory=list)  # stored size of each parent

    def by_path(self) -> dict[str, Item]:
        return {i.path: i for i in self.items}

    def objects(self) -> set[str]:
        """The content ids this snapshot needs (not its own id)."""
        return {i.oid for i in self.items if i.kind == FILE}


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def encode(snap: Snapshot) -> bytes:
    """The stored bytes of ``snap`` (its items sorted here); sets ``snap.id``."""
    from jam_core.objects import hasher

    if not 0 <= snap.time_ns <= MAX_TIME:
        raise SnapshotError(f"a snapshot dated {snap.time_ns} ns (after a parent dated after 2261-09) "
                            "cannot be recorded; refused")
    snap.items.sort(key=lambda i: i.path)
    head = {"parents": list(snap.parents), "parent_sizes": list(snap.parent_sizes), "time": snap.time_ns,
            "machine": {"host": snap.host, "id": snap.machine},
            "tree": snap.tree, "message": snap.message, "pins": sorted(snap.pins)}
    stored = zlib.compress(MAGIC + _dumps(head).encode("ascii") + b"\n" + body(snap.items), 6)
    h = hasher("b3")
    h.update(stored)
    snap.id = "b3:" + h.hexdigest()
    return stored


def body(items: list[Item]) -> bytes:
    """The entry lines of sorted ``items`` (the part of the text after the header line)."""
    from json.encoder import encode_basestring_ascii as q  # what json.dumps does for a str, in C

    return "".join([f'["f",{q(i.path)},{q(i.oid)},{i.size},{i.mode},{i.mtime_ns}]\n' if i.kind == FILE else
                    f'["l",{q(i.path)},{q(i.target)},{i.mtime_ns}]\n' for i in items]).encode("ascii")


def inflate_at_most(stored: bytes, limit: int) -> bytes | None:
    """The inflated bytes, at most ``limit`` of them: None if they are not zlib data; ValueError
    if truncated or larger (a zip bomb never inflates past ``limit``)."""
    try:
        d = zlib.decompressobj()
        text = d.decompress(stored, limit)
        if d.unconsumed_tail or not d.eof:
            raise ValueError("truncated or too large")
    except zlib.error:
        return None
    return text


def inflate(stored: bytes, label: str) -> bytes:
    """The canonical text of stored bytes (not validated; at most MAX_TEXT)."""
    try:
        text = inflate_at_most(stored, MAX_TEXT)
    except ValueError:
        raise SnapshotError(f"snapshot {label}: truncated or larger than {MAX_TEXT >> 20} MiB; refused") from None
    if text is None:
        raise SnapshotError(f"snapshot {label}: not a jam snapshot (bad compression); refused")
    return text


def encode_pointer(magic: bytes, oid: str, size: int) -> bytes:
    """A small meta file naming one object and its stored size: ``magic``, the id, the size
    (a machine's head names its snapshot; a recipe pointer its recipe)."""
    return magic + f"{oid}\n{size}\n".encode("ascii")


def decode_pointer(data: bytes, magic: bytes, most: int) -> tuple[str, int] | None:
    """(id, size) that :func:`encode_pointer` wrote, or None if ``data`` is not one: another
    magic, over 256 bytes, not a valid id, a size not in 1..``most``."""
    if not data.startswith(magic) or len(data) > 256:
        return None
    lines = data[len(magic):].decode("ascii", "replace").split("\n")
    if len(lines) != 3 or lines[2] != "" or not is_valid_oid(lines[0]) or not lines[1].isdigit() \
            or len(lines[1]) > 18:
        return None
    n = int(lines[1])
    return (lines[0], n) if 0 < n <= most else None


def id_of(stored: bytes) -> str:
    from jam_core.objects import hasher

    h = hasher("b3")
    h.update(stored)
    return "b3:" + h.hexdigest()


def parse(stored: bytes, expect: str | None = None) -> Snapshot:
    """Validate and read stored bytes. ``expect``: the id they must hash to. SnapshotError
    (one line) for anything that is not a well-formed snapshot."""
    sid = id_of(stored)
    label = (expect or sid)[:19]
    if expect is not None and sid != expect:
        raise SnapshotError(f"snapshot {label}: its bytes do not match its id (corrupt or replaced); refused")
    text = inflate(stored, label)
    try:
        snap = _parse_text(text)
    except SnapshotError as exc:
        raise SnapshotError(f"snapshot {label}: refused: {exc}") from None
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise SnapshotError(f"snapshot {label}: refused: malformed ({str(exc)[:100]})") from None
    snap.id = sid
    return snap


def _int(v, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SnapshotError(f"impossible {what} {str(v)[:40]!r}")
    return v


def _rel(v, what: str = "path") -> str:
    try:
        rel = check_rel(v)
    except ValueError as exc:
        raise SnapshotError(f"bad {what} {str(v)[:80]!r}: {exc}") from None
    if rel == ".":
        raise SnapshotError(f"bad {what} '.'")
    if "/.jam/" in f"/{rel}":
        # a .jam directory at any depth: made here, it would make its directory look like
        # another root to every walk (skipped: every file in it taken for deleted by the next
        # commit, and removed on the other machines by their next sync). No commit records one
        # (walks skip such directories); a file named .jam is a file like any other.
        raise SnapshotError(f"bad {what} {str(v)[:80]!r}: a .jam directory inside the tree")
    return rel


def _parse_text(text: bytes) -> Snapshot:
    if not text.startswith(MAGIC):
        if text.startswith(b"jam-snapshot "):
            raise SnapshotError("made by a newer jam (format version not supported)")
        raise SnapshotError("no jam-snapshot header")
    lines = text[len(MAGIC):].split(b"\n")
    if lines[-1] != b"" or len(lines) < 2:
        raise SnapshotError("truncated (no newline at the end)")
    head = json.loads(lines[0])
    if not isinstance(head, dict) or set(head) != {"parents", "parent_sizes", "time", "machine", "tree", "message",
                                                   "pins"}:
        raise SnapshotError("bad header fields")
    parents, sizes = head["parents"], head["parent_sizes"]
    if not isinstance(parents, list) or len(parents) > MAX_PARENTS or not all(is_valid_oid(p) for p in parents):
        raise SnapshotError("bad parents")
    if not isinstance(sizes, list) or len(sizes) != len(parents):
        raise SnapshotError("bad parent sizes")
    sizes = [_int(n, 1, MAX_TEXT, "parent size") for n in sizes]
    time_ns = _int(head["time"], 0, MAX_TIME, "time")
    machine = head["machine"]
    if not isinstance(machine, dict) or set(machine) != {"host", "id"}:
        raise SnapshotError("bad machine")
    host, mid = machine["host"], machine["id"]
    if not isinstance(host, str) or len(host) > 255 or not isinstance(mid, str) or not _MACHINE.match(mid):
        raise SnapshotError("bad machine")
    tree = head["tree"]
    if not isinstance(tree, str) or not _TREE.match(tree):
        raise SnapshotError(f"bad tree name {str(tree)[:40]!r}")
    message = head["message"]
    if not isinstance(message, str) or len(message) > MAX_MESSAGE:
        raise SnapshotError("bad message")
    pins = head["pins"]
    if not isinstance(pins, list):
        raise SnapshotError("bad pins")
    pins = [_rel(p, "pin") for p in pins]
    items: list[Item] = []
    files: set[str] = set()
    last = parent = ""
    rows = json.loads(b"[" + b",".join(lines[1:-1]) + b"]") if len(lines) > 2 else []
    lo, hi, big = -(1 << 63) + 1, (1 << 63) - 1, MAX_SIZE
    valid_oid, add_item, add_file = is_valid_oid, items.append, files.add
    for row in rows:
        if type(row) is not list or not row:
            raise SnapshotError("bad entry")
        kind = row[0]
        if kind == FILE and len(row) == 6:
            _, path, oid, size, mode, mtime = row
            if not valid_oid(oid):
                raise SnapshotError(f"bad object id {str(oid)[:80]!r}")
            if type(size) is not int or not 0 <= size <= big:
                _int(size, 0, big, "size")
            if type(mode) is not int or not 0 <= mode <= 0o7777:
                _int(mode, 0, 0o7777, "mode")
            if type(mtime) is not int or not lo <= mtime <= hi:
                _int(mtime, lo, hi, "mtime")
            item = Item(path, FILE, oid, size, mode, mtime)
        elif kind == LINK and len(row) == 4:
            _, path, target, mtime = row
            if not isinstance(target, str) or not target or "\0" in target or len(target) > 4095:
                raise SnapshotError("bad symlink target")
            try:
                os.fsencode(target)
            except UnicodeEncodeError:
                raise SnapshotError("bad symlink target") from None
            item = Item(path, LINK, mtime_ns=_int(mtime, lo, hi, "mtime"), target=target)
        else:
            raise SnapshotError(f"bad entry kind {str(kind)[:10]!r}")
        if type(path) is not str or path <= last:
            raise SnapshotError(f"entries out of order or repeated at {str(path)[:80]!r}")
        w = f"/{path}/"  # the common case (ASCII, normalised, not .jam) without check_rel's calls
        if not path.isascii() or "\0" in w or "//" in w or "/./" in w or "/../" in w or "/.jam/" in w:
            _rel(path)  # says why, or accepts (a name that is not ASCII)
        last = path
        # no entry may sit below another entry (a file is not a directory); an entry in the
        # same directory as the one before has the ancestors just looked at (only that
        # sibling was added since)
        cut = path.rfind("/")
        if cut < 0 or path[:cut] != parent:
            parent = path[:cut] if cut > 0 else ""
            while cut > 0:
                if path[:cut] in files:
                    raise SnapshotError(f"{path[:cut]!r} is both a file and a directory")
                cut = path.rfind("/", 0, cut)
        add_file(path)
        add_item(item)
    if sum(i.size for i in items) > MAX_TOTAL:  # each size possible, not all of them together
        raise SnapshotError("its files add up to an impossible size")
    return Snapshot(parents, time_ns, host, mid, tree, message, pins, items, parent_sizes=sizes)


# -- naming ------------------------------------------------------------------------------
def machine_id() -> str:
    """This machine's stable id: ``$JAM_MACHINE_ID`` (tests: two "machines" on one host), else
    ``machine-id`` in the user's data dir, made once (32 hex digits)."""
    env = os.environ.get("JAM_MACHINE_ID")
    if env is not None:
        if not _MACHINE.match(env):
            raise UsageError(f"JAM_MACHINE_ID {env[:40]!r}: expected lowercase letters, digits and '-' (at most 64)")
        return env
    from jam_core.root import user_data_dir

    path = user_data_dir() / "machine-id"
    try:
        text = path.read_text().strip()
        if _MACHINE.match(text):
            return text
        raise UsageError(f"{path}: not a machine id (remove it and jam makes a new one)")
    except FileNotFoundError:
        pass
    import uuid

    new = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".machine-id.{os.getpid()}")
    tmp.write_text(new + "\n")
    try:
        os.link(tmp, path)  # never over one another jam wrote at the same instant
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return machine_id()


def tree_name(root) -> str:
    """``[history] name`` (validated), else the root's directory name made safe for a remote's
    ``meta/`` (lowercase letters, digits, ``._-``)."""
    table = root.config.get("history", {})
    if not isinstance(table, dict):
        raise UsageError(f"{root.config_path}: 'history' must be a table")
    name = table.get("name")
    if name is not None:
        if not isinstance(name, str) or not _TREE.match(name):
            raise UsageError(f"{root.config_path}: history.name {str(name)[:40]!r}: expected lowercase letters, "
                             "digits, '.', '_' or '-' (at most 64, starting with a letter or digit)")
        return name
    safe = re.sub(r"[^a-z0-9._-]+", "-", root.path.name.lower()).lstrip("._-")[:64]
    return safe or "tree"


def changes(old: dict[str, Item], new: dict[str, Item]) -> tuple[list[str], list[str], list[str]]:
    """(added, modified, deleted) paths from ``old`` to ``new``, each sorted."""
    added = sorted(p for p in new if p not in old)
    deleted = sorted(p for p in old if p not in new)
    modified = sorted(p for p, i in new.items() if p in old and not old[p].same(i))
    return added, modified, deleted

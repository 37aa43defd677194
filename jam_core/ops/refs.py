"""What each root refers to, recorded on the remotes it uses, so that no root removes what
another still needs (invariants 6 and 12).

On every remote a root uses, ``meta/refs/<root id>`` lists the objects the root refers to (its
stubs, dirty ones included) and the number of copies it wants (``[place] copies``). A store
first records what it is about to store in ``meta/refs/<root id>.pending.<n>`` (so an object is
never on a remote unreferenced while its file is still being swapped); the full list is written
once per command and the pending files emptied. Before removing anything a root writes
``meta/removing/<root id>`` (the objects it is about to remove from that remote), and a copy
named there by another root does not count as a copy: two roots dropping two copies at the same
instant cannot both go ahead.

The root's id is ``[core] id`` in ``ROOT/.jam/config.toml``, recorded on first need.
"""

from __future__ import annotations

import os

from jam_core.errors import JamError, RemoteError, UsageError
from jam_core.model import Remote, Session
from jam_core.objects import is_valid_oid
from jam_core.placement import copies_of
from jam_core.root import Root
from jam_core.units import LazyRe

REFS = "refs"
REMOVING = "removing"
MAGIC = b"jam-refs 2\n"  # ends with "end <count>": a file cut short is told from a short list
_MAGIC1 = b"jam-refs 1\n"  # older jams: no end line
_ID = LazyRe(r"\A[0-9a-f]{32}\Z")
_NAME = LazyRe(r"\A([0-9a-f]{32})(?:\.pending\.([0-9]{1,6}))?\Z")


def root_id(root: Root) -> str:
    """This root's id (``[core] id``), recorded in its own config on first need. The caller
    holds ``root.lock()``. A malformed id is a usage error (never silently replaced: other
    roots' removals trust it).

    Only the root's own config counts (an id in the user's defaults, copied there from a
    root's config, would be every root's). And an id belongs to the ``.jam`` directory it was
    made in (``[core] home``, that directory's inode): a root copied with ``cp -a`` (or
    restored from a backup) has another one, and takes a new id, or its refs would replace the
    original's on every remote they share and one's `jam gc` remove what the other's stubs
    need. (A root moved to another filesystem takes a new id too: the refs of its old one are
    then left on the remotes, keeping their objects.)"""
    core = root.own_config().get("core", {})
    rid = core.get("id") if isinstance(core, dict) else None
    home = core.get("home") if isinstance(core, dict) else None
    if rid is not None and not (isinstance(rid, str) and _ID.match(rid)):
        raise UsageError(f"{root.config_path}: core.id {str(rid)[:40]!r} is malformed (32 hex digits expected)")
    here = os.stat(root.jam_dir).st_ino
    if rid is not None and home == here:
        return rid
    import uuid

    new = uuid.uuid4().hex if rid is None or home is not None else rid  # no home yet (an older jam's root): bound now

    def record(own: dict) -> None:
        table = own.setdefault("core", {})
        if not isinstance(table, dict):
            raise UsageError(f"{root.config_path}: 'core' must be a table")
        if table.get("id") == rid and table.get("home") == home:  # nobody changed it meanwhile
            table["id"], table["home"] = new, here
    own = root.update_config(record)
    return own["core"]["id"]


def encode(copies: int, oids) -> bytes:
    ids = sorted(set(oids))
    body = "".join(f"{o}\n" for o in ids)
    return MAGIC + f"copies {copies}\n{body}end {len(ids)}\n".encode()


def decode(data: bytes) -> tuple[int, set[str]]:
    """(copies, oids) of a refs file, a pending list or a removal intent. An empty file (an
    emptied pending list or intent) refers to nothing. Anything else that is not what
    :func:`encode` writes (a line that is no id, another format, a file cut short: the count
    of its end line) raises ValueError: a damaged list is never read as a shorter one. A
    copies count out of range is read as the most conservative (every copy needed)."""
    if not data:
        return 0, set()
    if data.startswith(MAGIC):
        whole = True
    elif data.startswith(_MAGIC1):
        whole = False
    else:
        raise ValueError("not a jam refs file")
    if not data.endswith(b"\n"):
        raise ValueError("cut short")
    lines = data[len(MAGIC):-1].split(b"\n")
    copies, oids, end = 1, set(), None
    for i, line in enumerate(lines):
        if line.startswith(b"copies ") and i == 0:
            try:
                copies = int(line[7:])
            except ValueError:
                copies = 1 << 30
            if not 1 <= copies <= 1 << 30:
                copies = 1 << 30
        elif whole and i == len(lines) - 1 and line.startswith(b"end ") and line[4:].isdigit():
            end = int(line[4:])
        else:
            text = line.decode("ascii", "replace")
            if not is_valid_oid(text):
                raise ValueError(f"line {i + 2} is not an object id")
            oids.add(text)
    if whole and end != len(oids):
        raise ValueError("cut short (its end line is missing or does not count its ids)")
    return copies, oids


class Users:
    """What the roots that use one remote refer to: ``{root id: (copies, oids)}``, and what each
    is about to remove from it (``removing``). A plain class: the module is on the cd hook's
    path, where a dataclass's decoration costs ~3 M instructions."""

    __slots__ = ("refs", "removing")

    def __init__(self, refs: dict[str, tuple[int, set[str]]] | None = None,
                 removing: dict[str, set[str]] | None = None):
        self.refs = {} if refs is None else refs
        self.removing = {} if removing is None else removing

    def __repr__(self) -> str:
        return f"Users(refs={self.refs!r}, removing={self.removing!r})"

    def needing(self, oid: str) -> dict[str, int]:
        return {rid: copies for rid, (copies, oids) in self.refs.items() if oid in oids}

    def being_removed(self, oid: str, but: str = "") -> bool:
        return any(oid in oids for rid, oids in self.removing.items() if rid != but)


def _read(remote: Remote, name: str, pm, session: Session) -> bytes:
    data = pm.hook.read_meta(remote=remote, name=name, session=session)
    if data is None:
        raise RemoteError(f"remote {remote.name!r}: its backend cannot read jam's metadata (no read_meta); "
                          "jam removes nothing from it")
    return b"" if data is False else bytes(data)


def _decoded(remote: Remote, name: str, data: bytes, whole: bool) -> tuple[int, set[str]]:
    """:func:`decode`, a damaged file (or an empty one where only a whole list is ever written:
    ``whole``) raised as a RemoteError: jam removes nothing from a remote it cannot read."""
    try:
        if whole and not data:
            raise ValueError("empty")
        return decode(data)
    except ValueError as exc:
        raise RemoteError(f"remote {remote.name!r}: meta/{name} is damaged ({exc}); jam removes nothing "
                          "from it until it is repaired (the root it belongs to rewrites it: run any jam "
                          "command there that stores, or `jam gc`)") from None


def users(remote: Remote, pm, session: Session) -> Users:
    """Read, live, every root's refs, pending lists and removal intents on ``remote``.
    Unreachable, or a backend without metadata: RemoteError (never taken for "no user")."""
    out = Users()
    for prefix in (REFS, REMOVING):
        names = pm.hook.list_meta(remote=remote, prefix=prefix, session=session)
        if names is None:
            raise RemoteError(f"remote {remote.name!r}: its backend cannot list jam's metadata (no list_meta); "
                              "jam removes nothing from it")
        for name in names:
            base = name.rpartition("/")[2]
            m = _NAME.match(base)
            if not m or name != f"{prefix}/{base}":
                continue
            rid = m.group(1)
            copies, oids = _decoded(remote, name, _read(remote, name, pm, session), prefix == REFS and not m.group(2))
            if prefix == REMOVING:
                out.removing.setdefault(rid, set()).update(oids)
                continue
            have = out.refs.get(rid, (0, set()))
            out.refs[rid] = (max(have[0], copies, 1 if oids else 0), have[1] | oids)
    return out


def _write(remote: Remote, name: str, data: bytes, pm, session: Session) -> None:
    """Write a metadata file. A backend without ``write_meta`` records nothing: jam then never
    removes anything from that remote either (``users`` refuses it), so nothing is at risk."""
    pm.hook.write_meta(remote=remote, name=name, data=data, session=session)


class Recorder:
    """One command's refs: pending lists before each store, the full list once at the end."""

    def __init__(self, root: Root, pm, session: Session):
        self.root, self.pm, self.session = root, pm, session
        self.rid = root_id(root)
        self.copies = copies_of(root.config)
        self.pending: dict[str, int] = {}  # remote name -> pending files written this command

    def before_store(self, remote: Remote, oids) -> None:
        """Record on ``remote`` that this root refers to ``oids`` before they are stored there.
        RemoteError if it cannot: then nothing is stored there either."""
        n = self.pending.get(remote.name, 0)
        _write(remote, f"{REFS}/{self.rid}.pending.{n}", encode(self.copies, oids), self.pm, self.session)
        self.pending[remote.name] = n + 1

    def removing_elsewhere(self, remote: Remote) -> set[str]:
        """What other roots said they are about to remove from ``remote``. Read after a store
        (whose pending refs were written before it): a removal that read the refs before our
        pending list landed has written its intent before that read, so it shows here, and the
        store's files are not swapped. A backend without metadata has no removals to fear."""
        names = self.pm.hook.list_meta(remote=remote, prefix=REMOVING, session=self.session)
        going: set[str] = set()
        for name in names or ():
            m = _NAME.match(name.rpartition("/")[2])
            if m and not m.group(2) and m.group(1) != self.rid and name == f"{REMOVING}/{m.group(1)}":
                going |= _decoded(remote, name, _read(remote, name, self.pm, self.session), False)[1]
        return going

    def intent(self, remote: Remote, oids) -> None:
        """Say on ``remote`` which objects this root is about to remove from it."""
        _write(remote, f"{REMOVING}/{self.rid}", encode(self.copies, oids) if oids else b"", self.pm, self.session)

    def publish(self, oids, remotes, exact: bool = False) -> list[str]:
        """Write the full refs on each of ``remotes`` and empty this command's pending lists.
        Returns one line per remote that could not be written (its pending lists stay: more
        is kept, never less). Unless ``exact`` (gc's list, from a walk of the tree), what the
        refs listed before is kept too: ``oids`` comes from the catalog, which may not know a
        stub (a stash killed between its swap and its catalog write, a stub copied by hand)."""
        oids = set(oids)
        problems = []
        for remote in remotes:
            try:
                mine = oids
                if not exact:
                    try:
                        mine = oids | decode(_read(remote, f"{REFS}/{self.rid}", self.pm, self.session))[1]
                    except (JamError, OSError, ValueError):
                        pass  # unreadable: written anew from what the catalog knows
                data = encode(self.copies, mine)
                _write(remote, f"{REFS}/{self.rid}", data, self.pm, self.session)
                for n in range(self.pending.pop(remote.name, 0)):
                    _write(remote, f"{REFS}/{self.rid}.pending.{n}", b"", self.pm, self.session)
            except (JamError, OSError) as exc:
                problems.append(f"remote {remote.name!r}: refs not recorded: {exc}")
        return problems


def live_oids(root: Root, cat) -> set[str]:
    """Every object this root refers to: the stubs the catalog knows and a fresh walk finds
    (dirty stubs too: their objects are never removed). The caller holds the lock."""
    from jam_core.scan import DIRTY, STUB, walk

    def on_error(rel, exc):
        raise JamError(f"{rel}: {exc.strerror or exc}; jam cannot tell what this root refers to, so it "
                       "removes nothing")

    oids = set(cat.oids())
    for e in walk(str(root.path), ".", on_error):
        if e.state in (STUB, DIRTY) and e.record is not None:
            oids.add(e.record.oid)
    return oids


def referenced(root: Root, cat, forgetting: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """What this root's refs list: its stubs' objects, what its edge caches hold for it (an
    object put on a cache by a checkout stays referenced until it expires there), and every
    object of every snapshot the root keeps, with the snapshots themselves (``jam commit``;
    ``forgetting``: as if those snapshots were already forgotten, for ``gc --keep --dry-run``).
    A history that cannot be read raises: it is never taken for "no snapshot"."""
    from jam_core.history.index import kept_objects
    from jam_core.placement import is_cache

    oids = set(cat.oids())
    oids |= kept_objects(root, forgetting)
    for r in root.remotes():
        if is_cache(r):
            oids |= set(cat.locations_on(r.name))
    return oids

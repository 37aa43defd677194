"""``jam gc``: remove from the root's remotes the objects nothing refers to any more, the stale
temporary files of killed uploads, and (edge caches) the objects whose files were not used for
the cache's time. Every removal goes through ``copies.remove_copies`` (invariant 12).

An object is unreferenced on a remote when no root's refs there name it and this root (walked
afresh, dirty stubs included) does not refer to it. A root of this machine that uses the remote
but has recorded no refs on it yet stops gc on that remote: it might need anything there.

Objects of the snapshots this root keeps (``jam commit``) are referenced (``refs.referenced``).
``keep`` ("daily 7, weekly 4, monthly 12", ``history.prune``) first forgets the snapshots those
rules do not keep (each with its reason; ``dry_run`` only says so), so their objects become
collectable in the same run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from jam_core.catalog import Catalog
from jam_core.errors import JamError, UsageError, describe
from jam_core.model import Remote, Session
from jam_core.ops.copies import _identity, remove_copies
from jam_core.ops.refs import Recorder, live_oids, referenced, users
from jam_core.placement import cache_age
from jam_core.root import CATALOG, CONFIG, JAM_DIR, Root, _read_toml, registered_roots


@dataclass
class GcResult:
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # (remote, oid, size)
    expired: list[tuple[str, str, int]] = field(default_factory=list)  # edge caches
    leftovers: list[tuple[str, str, int]] = field(default_factory=list)  # (remote, tmp/NAME, size)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (remote, oid, why)
    snapshots_kept: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, why) with keep
    forgotten: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, why) with keep
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def gc(root: Root, pm, dry_run: bool = False, session: Session | None = None, now: float | None = None,
       keep: str | None = None) -> GcResult:
    out = GcResult()
    session = session or Session()
    now = time.time() if now is None else now
    rules = None
    if keep is not None:
        from jam_core.history.prune import parse_rules

        rules = parse_rules(keep)
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        recorder = Recorder(root, pm, session)
        forgetting: set[str] = set()
        if rules is not None:
            forgetting = _thin(root, rules, dry_run, out, pm, session)
        own = live_oids(root, cat) | referenced(root, cat, forgetting if dry_run else frozenset())
        reachable: list[Remote] = []
        for r in root.remotes():
            try:
                _identity(root, r, pm, session)
                reachable.append(r)
            except (JamError, OSError) as exc:
                out.problems.append(f"remote {r.name!r}: skipped: {describe(exc)}")
        out.problems += recorder.publish(own, reachable, exact=True)  # this root's refs are current first
        for r in reachable:
            try:
                _one(root, cat, pm, session, r, own, recorder, dry_run, now, out)
            except (JamError, OSError) as exc:
                out.problems.append(f"remote {r.name!r}: {describe(exc)}")
    return out


def _heads_of_mine(root: Root, pm, session: Session) -> dict[str, str]:
    """{snapshot id: remote} that the remotes name now as this machine's head of this root's
    tree (read live; a remote that cannot be read names nothing here: the index's record of
    the head written there still counts)."""
    from jam_core.history.snapshot import machine_id, tree_name
    from jam_core.history.store import decode_head, durable_remotes, head_name, head_remotes

    named: dict[str, str] = {}
    try:
        name = head_name(tree_name(root), machine_id())
    except JamError:
        return named
    for r in head_remotes(durable_remotes(root)):
        try:
            data = pm.hook.read_meta(remote=r, name=name, session=session)
        except (JamError, OSError):
            continue
        head = decode_head(bytes(data)) if data else None
        if head is not None:
            named.setdefault(head[0], r.name)
    return named


def _thin(root: Root, rules: dict[str, int], dry_run: bool, out: GcResult, pm=None,
          session: Session | None = None) -> set[str]:
    """Forget the snapshots ``rules`` do not keep (HEAD always stays, and so does every snapshot
    a remote names as this machine's head: ``head:<remote>`` in the index). Returns their ids."""
    from jam_core.history.index import Index, exists
    from jam_core.history.prune import plan

    if not exists(root):
        return set()
    with Index(root, create=False) as ix:
        kept, forgotten = plan([(r[0], r[1]) for r in ix.rows()], rules, ix.head())
        # what a remote still names as this machine's head (a later head write failed there):
        # a clone from that remote fetches it and every object it names, so it stays
        named = {row[1]: row[0][5:] for row in ix.db.execute("SELECT key, value FROM meta WHERE key LIKE 'head:%'")}
        used = {r.name for r in root.remotes()}
        named = {sid: r for sid, r in named.items() if r in used}
        if forgotten and pm is not None:
            named.update(_heads_of_mine(root, pm, session or Session()))
        for sid, remote in sorted(named.items()):
            if sid in forgotten:
                del forgotten[sid]
                kept[sid] = f"this machine's head on remote {remote!r}"
        out.snapshots_kept = sorted(kept.items())
        out.forgotten = sorted(forgotten.items())
        if forgotten and not dry_run:
            ix.forget(set(forgotten))
    return set(forgotten)


def _one(root: Root, cat: Catalog, pm, session: Session, remote: Remote, own: set[str], recorder: Recorder,
         dry_run: bool, now: float, out: GcResult) -> None:
    listing = pm.hook.list_objects(remote=remote, session=session, sweep=not dry_run)
    if listing is None:
        out.problems.append(f"remote {remote.name!r}: its backend cannot list objects; nothing removed")
        return
    objects: dict[str, int] = {}
    for name, size in listing:
        if name.startswith("tmp/"):
            out.leftovers.append((remote.name, name, size))
        else:
            objects[name] = size
    u = users(remote, pm, session)
    if not dry_run and u.removing.get(recorder.rid):
        # An intent of this root while it holds its lock is stale (a jam killed mid-removal):
        # it would make every other root count that copy as gone until cleared.
        recorder.intent(remote, ())
    silent = _silent_roots(root, remote, set(u.refs))
    if silent:
        out.problems.append(f"remote {remote.name!r}: the jam root {silent[0]} uses it but has recorded no refs "
                            f"there yet; run `jam gc --dry-run` in it first (nothing removed from {remote.name!r})")
        return
    others = set().union(*(oids for _c, oids in u.refs.values())) if u.refs else set()
    unused = {oid: size for oid, size in objects.items() if oid not in own and oid not in others}
    if unused:  # the recipes and chunks a needed large file comes back from, whoever wrote them
        from jam_core.history.chunks import pieces_needed

        pieces, trouble = pieces_needed(remote, own | others, pm, session)
        if trouble:
            out.problems += [f"remote {remote.name!r}: {t}" for t in trouble]
            return
        unused = {oid: size for oid, size in unused.items() if oid not in pieces}
    expire: dict[str, int] = {}
    age = cache_age(remote)
    if age is not None:
        last = _last_used(cat, remote)
        for oid, size in objects.items():
            if oid in own and now - last.get(oid, 0.0) > age:
                expire[oid] = size
    if dry_run:
        out.removed += [(remote.name, o, s) for o, s in sorted(unused.items())]
        out.expired += [(remote.name, o, s) for o, s in sorted(expire.items())]
        return
    removed, refused = remove_copies(root, cat, pm, session, remote, unused, own, recorder)
    out.removed += [(remote.name, o, s) for o, s in sorted(removed.items())]
    out.kept += [(remote.name, o, why) for o, why in sorted(refused.items())]
    if expire:
        removed, refused = remove_copies(root, cat, pm, session, remote, expire, own, recorder)
        out.expired += [(remote.name, o, s) for o, s in sorted(removed.items())]
        out.kept += [(remote.name, o, why) for o, why in sorted(refused.items())]


def _last_used(cat: Catalog, remote: Remote) -> dict[str, float]:
    """When each object's files were last used: put on the cache, stashed, or used since."""
    last = {oid: at for oid, (_size, at) in cat.locations_on(remote.name).items()}
    uses = cat.uses()
    for path, (oid, _size) in cat.stubs().items():
        t = uses.get(path)
        if t is not None and t > last.get(oid, 0.0):
            last[oid] = t
    return last


def _silent_roots(root: Root, remote: Remote, ids: set[str]) -> list[str]:
    """Other roots of this machine that name this remote in their config but have no refs on it.
    A table names it by its identity; a table without an id (written by an older jam), or any
    table when this remote has none, by its place: the same url, or for a ``dir`` remote the
    same real path."""
    rid = remote.options.get("id")
    here = os.path.realpath(remote.location) if remote.kind == "dir" else None

    def names_it(t) -> bool:
        if not isinstance(t, dict):
            return False
        if rid and t.get("id"):
            return t.get("id") == rid
        if isinstance(t.get("url"), str) and t.get("url") == remote.url:
            return True
        loc = t.get("location")
        return (here is not None and t.get("kind") == "dir" and isinstance(loc, str)
                and os.path.realpath(loc) == here)

    out = []
    for other in registered_roots():
        if other == root.path:
            continue
        try:  # never blocking (a FIFO there), never unbounded (a link to /dev/zero)
            config = _read_toml(other / JAM_DIR / CONFIG) or {}
        except (OSError, UsageError):
            continue
        tables = config.get("remote")
        if not isinstance(tables, dict) or not any(names_it(t) for t in tables.values()):
            continue
        core = config.get("core")
        their = core.get("id") if isinstance(core, dict) else None
        if their not in ids:
            out.append(str(other))
    return out

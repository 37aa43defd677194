"""Policies: ``jam stash --auto`` and ``jam checkout --related``.

One scan of the root builds a plain :class:`FileRecord` per file (``last_used`` is the newest
of atime, mtime and jam's own record of use). Files that must never leave are dropped before
the policies are asked, and dropped again from what they answer (a policy is never trusted to
respect them): pinned (a pin on a directory covers its contents), ignored by
``ROOT/.jamignore`` (gitignore syntax), hard-linked, dirty or unreadable stubs, stubs, empty
files and files smaller than ``core.min_size``. Nominations are merged per file, keeping every
policy's reason.

Configuration (``ROOT/.jam/config.toml`` over the user's defaults):

* ``[policy.NAME]`` tables switch policies on; a policy runs only when its table is present.
* ``[policy] use_atime = false`` ignores atime (when backups or indexers read everything).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, itemgetter
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from jam_core.errors import UsageError
from jam_core.model import FETCH, STASH, FileRecord, Nomination
from jam_core.policy.records import Candidates, Records, inventory
from jam_core.root import Root
from jam_core.scan import gc_paused


def configured_policies(config: Mapping[str, Any]) -> list[str]:
    """Names of the ``[policy.NAME]`` tables (scalars in ``[policy]`` are settings)."""
    policy = config.get("policy")
    if policy is None:
        return []
    if not isinstance(policy, Mapping):
        raise UsageError(f"policy: expected a table of policies ([policy.age], ...), got {policy!r}")
    return sorted(k for k, v in policy.items() if isinstance(v, Mapping))


class PlanItem(NamedTuple):
    """One file a plan stashes (a named tuple: a plan of 100,000 files builds them in C)."""

    path: str
    size: int
    last_used: float
    reasons: list[tuple[str, str]]  # (policy, reason), one per nominating policy


@dataclass
class Plan:
    """What ``jam stash --auto`` would stash and why."""

    items: list[PlanItem] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)  # the configured ones
    kept: dict[str, int] = field(default_factory=dict)  # why -> how many files policies may not have
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, policy) dropped by the core
    local_bytes: int = 0
    candidates: int = 0
    began_ns: int = 0  # when the scan began: a file changed since (its ctime) is not stashed on this plan
    inodes: dict[str, int] = field(default_factory=dict, repr=False)  # of the chosen files, as the scan saw them

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.items)

    def to_json(self) -> dict:
        return {
            "policies": self.policies,
            "files": [{"path": i.path, "size": i.size, "last_used": i.last_used,
                       "reasons": [{"policy": p, "reason": r} for p, r in i.reasons]} for i in self.items],
            "bytes": self.bytes,
            "local_bytes": self.local_bytes,
            "candidates": self.candidates,
            "kept": self.kept,
        }


def ask(pm, root: Root, records: Sequence[FileRecord], purpose: str, anchors: Sequence[str],
        local_bytes: int, stubs: Sequence[FileRecord] | Callable[[], Sequence[FileRecord]] = ()) -> list[Nomination]:
    """Every policy's nominations. ``stubs`` (or a function that makes them, called only if a
    policy reads ``records.stubs``) are the tree's clean stubs, by path."""
    offered = records if isinstance(records, Records) else Records(records)
    offered.stubs = stubs
    answers = pm.hook.select(root=root.path, records=offered, purpose=purpose,
                             anchors=tuple(anchors), config=root.config, local_bytes=local_bytes)
    out = []
    for answer in answers:
        for n in answer or ():
            if isinstance(n, Nomination):
                out.append(n)
    return out


def merge(nominations: Iterable[Nomination], allowed: Mapping[str, FileRecord],
          refused: list[tuple[str, str]] | None = None) -> list[PlanItem]:
    """One item per allowed file, with every policy's reason; anything else is dropped."""
    if isinstance(allowed, Candidates):
        nominations = nominations if isinstance(nominations, list) else list(nominations)
        items = _merge_once(nominations, allowed, refused)
        if items is not None:
            return items
    items: dict[str, PlanItem] = {}
    get = items.get
    if isinstance(allowed, Candidates):  # (size, last_used) from its lists: no record made
        index, sizes, lasts = allowed.index().get, allowed.sizes, allowed.lasts
    else:
        index = None
        allowed_get = allowed.get
    for n in nominations:
        path = n.path
        item = get(path)
        if item is None:
            if index is not None:
                i = index(path)
                known = None if i is None else (sizes[i], lasts[i])
            else:
                rec = allowed_get(path)
                known = None if rec is None else (rec.size, rec.last_used)
            if known is None:
                if refused is not None:
                    refused.append((path, n.policy))
                continue
            items[path] = PlanItem(path, known[0], known[1], [(n.policy, n.reason)])
        elif (n.policy, n.reason) not in item.reasons:
            item.reasons.append((n.policy, n.reason))
    for item in items.values():
        if len(item.reasons) > 1:
            item.reasons.sort()
    return sorted(items.values(), key=attrgetter("path"))


_path, _policy, _reason = attrgetter("path"), attrgetter("policy"), attrgetter("reason")


def _merge_once(nominations: list[Nomination], cands: Candidates,
                refused: list[tuple[str, str]] | None) -> list[PlanItem] | None:
    """``merge`` of nominations that name each file once (one policy: the dry-run's common
    case) on the candidates' lists, in C passes: which candidates are named is asked of a
    dict of the named paths (no index of every candidate), and the items are built from the
    lists (no Python step per file). None when a path is named twice (``merge`` then keeps
    every reason its own way)."""
    named = dict(zip(map(_path, nominations), nominations, strict=True))
    if len(named) != len(nominations) or len(named) < 2:
        return None
    paths = cands.paths
    at = list(compress(range(len(paths)), map(named.__contains__, paths)))
    if len(at) != len(named):  # named but not a candidate: refused, in order (and the general way)
        return None
    at.sort(key=paths.__getitem__)
    chosen = itemgetter(*at)(paths)
    by = itemgetter(*chosen)(named)
    reasons = [[pair] for pair in zip(map(_policy, by), map(_reason, by), strict=True)]  # [(policy, reason)] each
    return list(map(tuple.__new__, repeat(PlanItem),
                    zip(chosen, itemgetter(*at)(cands.sizes), itemgetter(*at)(cands.lasts), reasons, strict=True)))


def plan_auto(root: Root, pm, keep: list | None = None) -> Plan:
    """What the configured policies would stash, with their reasons. Reads no file content.
    ``keep`` (a list) gets the scan and the nominations the plan was made from, for a caller
    that would rather not have them freed here (a dry-run about to leave with ``os._exit``)."""
    config = root.config
    names = configured_policies(config)
    if not names:
        raise UsageError(
            f"no policy is configured for {root.path}: add a [policy.age], [policy.lru] or "
            f"[policy.budget] table to {root.config_path} (see the README, Policies)"
        )
    import time

    # (Kernels before 6.13 stamp ctimes from a clock up to a tick behind: a change in that
    # tick after this may go unseen; later ones stamp it finely.)
    began = time.time_ns()
    with gc_paused():  # a record per file and no cycle: collections would only walk them again and again
        inv = inventory(root)
        plan = Plan(policies=names, kept=inv.kept_counts(), local_bytes=inv.local_bytes,
                    candidates=len(inv.candidates), began_ns=began)
        records = Records(candidates=inv.candidates)  # FileRecords made only if a policy reads them
        stubs = inv.stubs.sorted_records  # made only if a policy reads them (lru)
        nominations = ask(pm, root, records, STASH, (), inv.local_bytes, stubs) if records else []
        plan.items = merge(nominations, inv.candidates, plan.refused)
        if plan.items:
            plan.inodes = inv.candidates.inodes_of(i.path for i in plan.items)
        if keep is not None:
            keep += (inv, records, stubs, nominations)
    return plan


def stash_auto(root: Root, pm, session=None, dry_run: bool = False):
    """Run the policies; unless ``dry_run``, stash what they chose. Returns (plan, result|None)."""
    plan = plan_auto(root, pm)
    if dry_run or not plan.items:
        return plan, None
    return plan, carry_out(root, plan, pm, session)


def carry_out(root: Root, plan: Plan, pm, session=None):
    """Stash what a plan chose, as policies do: minimum size applies, pins are re-checked, and a
    file changed since the plan's scan began, or another one now at a chosen path (moved there
    with its directory: a rename keeps the files' ctimes), is left for the next run (the
    policies judged the one they saw)."""
    from jam_core.ops.stash import stash

    return stash(root, [i.path for i in plan.items], pm, session, explicit=False,
                 changed_after_ns=plan.began_ns or None, judged=plan.inodes or None)


def related(root: Root, pm, anchors: Sequence[str]) -> list[PlanItem]:
    """Stubs the select hook (purpose ``fetch``) nominates to come along with ``anchors``."""
    anchors = [a for a in anchors if root.abs(a).is_file()]  # a directory comes whole anyway
    inv = inventory(root)
    records = inv.stubs.sorted_records()
    nominations = ask(pm, root, records, FETCH, list(anchors), inv.local_bytes)
    anchor_set = set(anchors)
    return [i for i in merge(nominations, inv.stubs) if i.path not in anchor_set]


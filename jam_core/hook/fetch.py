"""What `jam hook-fetch DIR` does when the cd hook finds stubs to fetch: where the visit is, what
it covers (``hook.depth``), fetching its stubs in groups (so Ctrl-C keeps the groups done),
recording the visit as use, and healing the index when it sent the hook here for nothing.

The CLI (jam_core/cli/hook.py) only prints and decides foreground or background."""

from __future__ import annotations

import os

from jam_core.errors import UsageError
from jam_core.hook.marks import fold
from jam_core.hook.settings import HookSettings, settings
from jam_core.hook.visit import Visit, plan, record_visit
from jam_core.ops.checkout import checkout
from jam_core.ops.common import Result
from jam_core.root import Root, RootBusy, abspath, find_root, valid_rel
from jam_core.scan import STUB, classify


class Arrival:
    """A visit the hook reported: the root, the directory (real path), what it covers.
    ``counted``: this visit is recorded as use already (``count_visit``), not to be recorded
    a second time."""

    __slots__ = ("root", "path", "visit", "settings", "counted", "held")

    def __init__(self, root: Root, path: str, visit: Visit, settings: HookSettings, counted: bool = False,
                 held=None):
        self.root = root
        self.path = path
        self.visit = visit
        self.settings = settings
        self.counted = counted
        self.held = held  # see hold_catalog; closed by leave()


def hold_catalog(root: Root):
    """A connection to the root's catalog, open (and idle: no transaction, no lock) until
    :func:`leave`: the fold, the checkout and the record of the visit each open and close
    their own, and SQLite checkpoints the WAL into the database (two fdatasyncs), deletes it
    and makes it again (two more) whenever the last connection of a process closes. Held
    open, that happens once per hook-fetch, at leave(). None if the catalog cannot be opened
    (the step that needs it says why)."""
    from jam_core.catalog import Catalog
    from jam_core.errors import JamError
    from jam_core.root import CATALOG

    if not os.path.isfile(root.jam_dir / CATALOG):
        return None  # a root without a catalog yet: nothing to hold (and none to create here)
    try:
        return Catalog(root.jam_dir / CATALOG)
    except JamError:
        return None


def leave(a: Arrival | None) -> None:
    """Close what :func:`arrive` held open (before a fork, and before the process ends)."""
    if a is not None and a.held is not None:
        held, a.held = a.held, None
        held.close()


def arrive(directory: str) -> Arrival | None:
    """Where a ``cd`` landed, and what a fetch there would cover. None outside every root and
    inside ``.jam``. The visit marks the hooks left are folded into the catalog's uses only once
    the visit's own stubs are fetched (``count_visit``): a cd never waits for them first."""
    # The real directory (a symlink inside the root leads to where it points; the plan then
    # walks from the root's descriptor and follows none).
    path = abspath(os.path.realpath(abspath(directory)))
    top = find_root(path)
    if top is None:
        return None
    root = Root(top)
    if path != top and path.relative_to(top).parts[0] == ".jam":
        return None
    held = hold_catalog(root)
    try:
        hs = settings(root)
        rel = root.rel(path)
        return Arrival(root, str(path), plan(root, rel, hs), hs, held=held)
    except BaseException:
        if held is not None:
            held.close()
        raise


def count_visit(a: Arrival) -> None:
    """Fold the marks the shells left into the catalog's uses (each visited directory scanned),
    then record this visit as use of every file in its scope, unless the fold already did (the
    shell's mark for this very ``cd``)."""
    folded: set[str] = set()
    fold(a.root, recorded=folded)
    if not a.counted and a.visit.rel not in folded:
        a.counted = True
        record_visit(a.root, a.visit)


GROUP_FILES, GROUP_BYTES = 32, 64 << 20  # the first group; each next one holds twice as many files


def fetch(a: Arrival, pm, session) -> Result:
    """Check out the visit's stubs in groups (a Ctrl-C keeps the groups done; the first is small,
    each next one twice as large, so many stubs cost a few checkouts), rebuild the cd index
    once, then record the visit as use. Never waits for another jam working on the root (an
    automatic commit this hook started, a long stash): the stubs are left for the next cd, and
    the hook says so."""
    from jam_core.hook.index import begin

    result = Result()
    behind = begin(a.root)  # a killed run left the index behind: all of it, at the end
    try:
        for group in groups(a.visit.stubs):
            r = checkout(a.root, group, pm, session, wait=False, index=False)
            result.done += r.done
            result.failed += r.failed
            result.skipped += r.skipped
            if r.aborted:
                result.aborted = r.aborted
                break
    except RootBusy:
        result.aborted = (f"another jam process is working on {a.root.path}; the stubs here are left for the "
                          "next cd (or `jam checkout`)")
    finally:
        # the index: the marks these checkouts moved (all if behind); none moved, it is as it was
        _refresh(a.root, None if behind else [rel for rel, _ in result.done])
    count_visit(a)
    return result


def _refresh(root: Root, changed: list[str] | None) -> None:
    """The cd hooks' index after the groups' checkouts of ``changed`` (under the lock, never
    waiting for it: another jam rebuilds it when it is done)."""
    from jam_core.catalog import Catalog
    from jam_core.errors import JamError
    from jam_core.hook.index import refresh
    from jam_core.root import CATALOG

    try:
        with root.lock(wait=False), Catalog(root.jam_dir / CATALOG) as cat:
            refresh(root, cat, changed=changed)
    except (JamError, OSError):
        pass


def groups(stubs: list[tuple[str, int]]):
    group: list[str] = []
    size, most = 0, GROUP_FILES
    for rel, n in stubs:
        group.append(rel)
        size += n
        if len(group) >= most or size >= GROUP_BYTES:
            yield group
            group, size, most = [], 0, most * 2
    if group:
        yield group


def heal(a: Arrival) -> None:
    """The index sent the hook here for nothing (stubs moved away, an interrupted checkout, a
    new hook.depth): rebuild the index without the catalog's rows of this scope that are no
    stub now. The rows stay: what keeps a stub's object from gc is never dropped on a cd's
    look (a stub hidden under a mount, or moved out of the root with a symlink left, still
    needs it); `jam doctor --fix` forgets a row once it proves the stub gone."""
    from jam_core.catalog import Catalog
    from jam_core.hook.index import refresh
    from jam_core.root import CATALOG

    root, v, hs = a.root, a.visit, a.settings
    base = "" if v.rel == "." else v.rel + "/"
    try:
        with root.lock(wait=False), Catalog(root.jam_dir / CATALOG) as cat:
            gone = set()
            for path in cat.stubs():
                if not path.startswith(base) or not valid_rel(path):
                    continue  # a row that is no path inside the root: doctor reports it
                below = path[len(base):].count("/")
                if (hs.depth is None or below <= hs.depth) and not _fetchable(root.abs(path)):
                    gone.add(path)
            refresh(root, cat, leave_out=gone)
    except UsageError:
        pass  # another jam is working on this root; it refreshes the index when it is done


def _fetchable(path) -> bool:
    """A clean stub: what a cd fetches. A stub written into is never fetched over (invariant 5):
    left out of the index, it costs no process on every cd (the hook says so once)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return classify(str(path), st)[0] == STUB

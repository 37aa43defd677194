"""The main screen: the listing of one directory, its path, the summary bar, the info pane and
the actions. Every read and every action runs in a thread worker that calls jam_core's library
functions and reports by message; the screen only shows what comes back."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.worker import get_current_worker

from jam_core.errors import JamError, describe
from jam_core.model import Session
from jam_core.ops import browse
from jam_core.ops.status import status
from jam_core.tui.messages import (
    ActionDone,
    CatalogTotals,
    DetailsReady,
    FilterCleared,
    Highlighted,
    Listed,
    LoadFailed,
    MarksChanged,
    PlanReady,
    Progress,
    Scanned,
    TotalsReady,
)
from jam_core.tui.screens.confirm import ConfirmScreen
from jam_core.tui.widgets.filter_box import FilterBox
from jam_core.tui.widgets.info_pane import InfoPane
from jam_core.tui.widgets.keys_bar import KeysBar
from jam_core.tui.widgets.listing import Listing, _printable
from jam_core.tui.widgets.path_bar import PathBar
from jam_core.tui.widgets.status_line import StatusLine
from jam_core.tui.widgets.summary_bar import SummaryBar
from jam_core.units import human


class Cancelled(BaseException):
    """Escape during a transfer: raised from the session's progress callback, so the core
    stops where it is (an interrupted batch leaves its stubs and files as they were)."""


class TuiSession(Session):
    """A Session whose transfers stop once ``cancel()`` was called: the backends' connections
    are closed (``close()`` interrupts them) and the next progress report raises."""

    def __init__(self, progress=None, total=None) -> None:
        super().__init__(progress=progress, total=total)
        self.cancelled = False

    def progress(self, n: int) -> None:
        if self.cancelled:
            raise Cancelled()
        super().progress(n)

    def cancel(self) -> None:
        self.cancelled = True
        self.close()


VERBS = {"fetch": "Fetch", "stash": "Stash", "pin": "Pin (and fetch)", "unpin": "Unpin", "doctor": "Check"}


class MainScreen(Screen[None]):
    BINDINGS = [
        Binding("enter,right", "open", "Open", show=False, id="jam.open"),
        Binding("backspace,left", "up", "Up", show=False, id="jam.up"),
        Binding("f", "act('fetch')", "Fetch", id="jam.fetch"),
        Binding("s", "act('stash')", "Stash", id="jam.stash"),
        Binding("p", "act('pin')", "Pin", id="jam.pin"),
        Binding("d", "act('doctor')", "Doctor", id="jam.doctor"),
        Binding("r", "refresh", "Refresh", show=False, id="jam.refresh"),
        Binding("slash", "filter", "Filter", key_display="/", id="jam.filter"),
        Binding("i", "info", "Info", id="jam.info"),
        Binding("t", "tiers", "Tiers", id="jam.tiers"),
        Binding("o", "sort_cycle", "Sort", show=False, id="jam.sort"),
        Binding("1", "sort('name')", "Sort by name", show=False, id="jam.sort-name"),
        Binding("2", "sort('size')", "Sort by size", show=False, id="jam.sort-size"),
        Binding("3", "sort('local')", "Sort by local bytes", show=False, id="jam.sort-local"),
        Binding("4", "sort('used')", "Sort by last use", show=False, id="jam.sort-used"),
        Binding("a", "sizes", "True / disk size", show=False, id="jam.sizes"),
        Binding("escape", "escape", "Cancel / clear", show=False, id="jam.escape"),
    ]

    def __init__(self, root, pm, rel: str = ".") -> None:
        super().__init__()
        self.root = root
        self.pm = pm
        self.rel = rel
        self.wanted = rel
        self.plan = None
        self.totals = None
        self.plan_due = False
        self.scan_due = False
        self.scanned = None  # the last status of the whole root (jam_core.ops.status.Status)
        self.session: TuiSession | None = None
        self.busy = ""

    def compose(self) -> ComposeResult:
        yield PathBar(id="path")
        yield InfoPane(id="info")
        yield Listing(id="listing")
        with Vertical(id="bottom"):
            yield FilterBox(placeholder="filter: names containing…", id="filter")
            yield SummaryBar(id="summary")
            yield StatusLine(id="status")
            yield KeysBar(self.shown_keys(), id="keys")

    def shown_keys(self) -> list:
        """The keys the bottom line names: this screen's, the listing's, the app's."""
        return [*self.BINDINGS, *Listing.BINDINGS, *type(self.app).BINDINGS]

    def on_mount(self) -> None:
        self.query_one(PathBar).show_path(self.root.path.name, self.rel)
        self.query_one(Listing).focus()
        self.reload(self.rel)

    # -- loading ------------------------------------------------------------------------------
    # The first screen is one scandir of the directory shown (stubs trusted by the catalog's
    # stamps: no xattr read for an untouched stub) and comes first; the stubs below each child
    # directory follow from one catalog query; the scan of the whole root (local bytes, the
    # summary) starts only once that listing is on screen, so it never competes with the first
    # paint; the policies' plan after the scan.
    def reload(self, rel: str, focus: str = "") -> None:
        """List ``rel`` and scan the whole root again (start, `r`, after an action)."""
        self.scanned = None
        self.scan_due = True
        self.plan_due = True  # asked once the scan is done: the first screen comes first
        self.load(rel, focus)

    def load(self, rel: str, focus: str = "", rescan: bool = False) -> None:
        """List ``rel``; its totals come from the root's last scan (one scan serves every
        directory: moving around costs one scandir)."""
        if rescan:
            self.scanned, self.scan_due = None, True
        self.wanted = rel
        self.load_dir(rel, focus, self.scanned)

    @work(thread=True, exclusive=True, group="load")
    def load_dir(self, rel: str, focus: str, tree) -> None:
        worker = get_current_worker()
        try:
            rows = browse.entries(self.root, rel)
        except Exception as exc:  # noqa: BLE001  shown, never a crash
            self.post_message(LoadFailed(rel, describe(exc)))
            return
        if worker.is_cancelled:
            return
        self.post_message(Listed(rel, rows, focus))
        if tree is not None:
            self.post_message(TotalsReady(rel, browse.dir_totals(self.root, rel, tree)))
            return
        known = browse.catalog_totals(self.root, rel)
        if not worker.is_cancelled:
            self.post_message(CatalogTotals(rel, known))

    def _scan_if_due(self) -> None:
        if self.scan_due:
            self.scan_due = False
            self.call_after_refresh(self.scan_root)

    @work(thread=True, exclusive=True, group="scan")
    def scan_root(self) -> None:
        """One status scan of the whole root: the summary, and the totals of every directory."""
        worker = get_current_worker()
        try:
            tree = status(self.root, ".")
        except Exception as exc:  # noqa: BLE001
            self.post_message(LoadFailed(self.rel, describe(exc)))
            return
        if worker.is_cancelled:
            return
        self.post_message(Scanned(tree, browse.summary(self.root, tree)))

    @work(thread=True, exclusive=True, group="totals")
    def fold_totals(self, rel: str, tree) -> None:
        totals = browse.dir_totals(self.root, rel, tree)
        if not get_current_worker().is_cancelled:
            self.post_message(TotalsReady(rel, totals))

    @work(thread=True, exclusive=True, group="plan")
    def load_plan(self) -> None:
        from jam_core.policy.plan import plan_auto

        try:
            plan = plan_auto(self.root, self.pm)
        except Exception as exc:  # noqa: BLE001
            self.post_message(PlanReady(None, describe(exc)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(PlanReady(plan))

    def on_scanned(self, m: Scanned) -> None:
        self.scanned = m.tree
        self.query_one(SummaryBar).show_summary(m.summary)
        self.fold_totals(self.rel, m.tree)
        if self.plan_due:
            self.plan_due = False
            self.load_plan()

    def on_listed(self, m: Listed) -> None:
        if m.rel != self.wanted:
            return
        if m.rel != self.rel:
            self._clear_filter()
        self.rel = m.rel
        self.totals = None
        self.query_one(PathBar).show_path(self.root.path.name, m.rel)
        self.query_one(Listing).set_rows(m.rows, m.focus)
        self._scan_if_due()

    def on_catalog_totals(self, m: CatalogTotals) -> None:
        if m.rel != self.rel or self.totals is not None:
            return
        listing = self.query_one(Listing)
        browse.apply_catalog_totals(listing.rows, m.known)
        listing.update_rows()

    def on_totals_ready(self, m: TotalsReady) -> None:
        if m.rel != self.rel:
            return
        listing = self.query_one(Listing)
        browse.apply_totals(listing.rows, m.totals)
        self.totals = m.totals
        listing.update_rows()
        self._refresh_info()  # a directory's totals in the pane

    def on_plan_ready(self, m: PlanReady) -> None:
        self.plan = m.plan
        self.query_one(SummaryBar).show_plan(m.plan, m.error)
        self._refresh_info()

    def on_load_failed(self, m: LoadFailed) -> None:
        self.wanted = self.rel
        self._scan_if_due()
        self.app.notify(f"{_printable(m.rel)}: {m.error}", title="cannot list", severity="error")

    # -- navigation ---------------------------------------------------------------------------
    def action_open(self) -> None:
        row = self.query_one(Listing).current
        if row is not None and row.is_dir:
            self.load(row.rel)

    def action_up(self) -> None:
        if self.rel not in ("", "."):
            self.load(browse.parent(self.rel), focus=self.rel.rpartition("/")[2])

    def action_refresh(self) -> None:
        self.reload(self.rel)

    def action_sort(self, key: str) -> None:
        self.query_one(Listing).set_sort(key)

    def action_sort_cycle(self) -> None:
        self.query_one(Listing).cycle_sort()

    def action_sizes(self) -> None:
        self.query_one(Listing).toggle_sizes()

    def action_tiers(self) -> None:
        self.app.push_screen(self.app.screens_ready().tiers)

    # -- filter -------------------------------------------------------------------------------
    def action_filter(self) -> None:
        box = self.query_one(FilterBox)
        box.add_class("-shown")
        box.focus()

    @on(FilterBox.Changed)
    def _filter_changed(self, event: FilterBox.Changed) -> None:
        self.query_one(Listing).set_filter(event.value)

    @on(FilterBox.Submitted)
    def _filter_submitted(self, event: FilterBox.Submitted) -> None:
        self.query_one(FilterBox).remove_class("-shown")
        listing = self.query_one(Listing)
        listing.focus()
        listing.move_to(0)

    def on_filter_cleared(self, m: FilterCleared) -> None:
        self._clear_filter()
        self.query_one(Listing).focus()

    def _clear_filter(self) -> None:
        box = self.query_one(FilterBox)
        box.remove_class("-shown")
        if box.value:
            box.value = ""
        listing = self.query_one(Listing)
        if listing.filter:
            listing.set_filter("")

    def action_escape(self) -> None:
        if self.session is not None:
            self.session.cancel()
            self.workers.cancel_group(self, "action")
            self.app.notify("cancelling: what finished stays finished", severity="warning")
        elif self.query_one(Listing).filter:
            self._clear_filter()
        elif self.query_one(InfoPane).has_class("-shown"):
            self.query_one(InfoPane).remove_class("-shown")

    # -- info pane ----------------------------------------------------------------------------
    def action_info(self) -> None:
        pane = self.query_one(InfoPane)
        pane.toggle_class("-shown")
        self._refresh_info()

    def on_highlighted(self, m: Highlighted) -> None:
        self._refresh_info()

    def on_marks_changed(self, m: MarksChanged) -> None:
        self.query_one(StatusLine).show_marks(m.count, m.bytes)

    def _refresh_info(self) -> None:
        if not self.query_one(InfoPane).has_class("-shown"):
            return
        row = self.query_one(Listing).current
        if row is not None:
            self.load_info(row.rel)

    @work(thread=True, exclusive=True, group="info")
    def load_info(self, rel: str) -> None:
        try:
            d = browse.details(self.root, rel)
        except Exception as exc:  # noqa: BLE001
            d = browse.Details(rel, "?", problem=describe(exc))
        if not get_current_worker().is_cancelled:
            self.post_message(DetailsReady(d))

    def on_details_ready(self, m: DetailsReady) -> None:
        row = self.query_one(Listing).current
        if row is None or row.rel != m.details.rel:
            return
        reasons = []
        if self.plan is not None:
            prefix = row.rel + "/"
            items = [i for i in self.plan.items if i.path == row.rel or i.path.startswith(prefix)]
            if row.is_dir and items:
                reasons.append(f"{len(items)} files ({human(sum(i.size for i in items))})")
            elif items:
                reasons.extend(f"{p}: {r}" for p, r in items[0].reasons)
        self.query_one(InfoPane).show_details(m.details, reasons, row if row.is_dir and row.totals else None)

    # -- actions ------------------------------------------------------------------------------
    def _targets(self) -> list:
        listing = self.query_one(Listing)
        if listing.marks:
            return list(listing.marks.values())
        return [listing.current] if listing.current is not None else []

    def action_act(self, verb: str) -> None:
        if self.busy:
            self.app.notify(f"{self.busy} is running (Esc cancels it)", severity="warning")
            return
        rows = [r for r in self._targets() if r.kind in ("file", "dir")]
        if not rows:
            self.app.notify("nothing to act on here (a symlink or special file is never stashed)",
                            severity="warning")
            return
        if verb == "pin" and all(r.pinned for r in rows):
            verb = "unpin"
        if len(rows) > 1 or rows[0].is_dir:
            nbytes = sum(r.size for r in rows)
            what = (f"the directory {_printable(rows[0].name)}/ ({rows[0].files} files, {human(nbytes)})"
                    if len(rows) == 1 else f"{len(rows)} marked entries ({human(nbytes)})")
            self.app.push_screen(ConfirmScreen(f"{VERBS[verb]} {what}?"),
                                 lambda yes: self._start(verb, rows) if yes else None)
        else:
            self._start(verb, rows)

    def _start(self, verb: str, rows: list) -> None:
        self.busy = verb
        self.query_one(StatusLine).start(VERBS[verb])
        self.session = TuiSession(progress=self._count_bytes, total=self._count_total)
        self._xfer_done = self._xfer_total = self._xfer_shown = 0
        self.run_action(verb, [r.rel for r in rows], self.session)

    def _count_total(self, total: int) -> None:  # worker thread
        self._xfer_total += total
        self.post_message(Progress(self._xfer_done, self._xfer_total))

    def _count_bytes(self, n: int) -> None:  # worker thread
        self._xfer_done += n
        if self._xfer_done - self._xfer_shown >= max(1, self._xfer_total // 100) or self._xfer_done >= self._xfer_total:
            self._xfer_shown = self._xfer_done
            self.post_message(Progress(self._xfer_done, self._xfer_total))

    def on_progress(self, m: Progress) -> None:
        if self.busy:
            self.query_one(StatusLine).progress(m.done, m.total)

    @work(thread=True, exclusive=True, group="action")
    def run_action(self, verb: str, rels: list[str], session: TuiSession) -> None:
        worker = get_current_worker()
        try:
            self._say_if_locked(verb)
            text, severity, lines = self._do(verb, rels, session, worker)
        except Cancelled:
            text, severity, lines = f"{verb}: cancelled; what finished stays finished", "warning", []
        except JamError as exc:
            text, severity, lines = f"{verb}: {exc}", "error", []
        except Exception as exc:  # noqa: BLE001  a notification, never a traceback
            text, severity, lines = f"{verb}: {describe(exc)}", "error", []
        finally:
            session.close()
        self.post_message(ActionDone(verb, text, severity, lines))

    def _say_if_locked(self, verb: str) -> None:
        """Another jam holds the root's lock: say so before the action waits for it (Root.lock's
        own line goes to a stderr nobody sees here)."""
        from jam_core.errors import UsageError

        try:
            with self.root.lock(wait=False):
                pass
        except UsageError:
            self.app.call_from_thread(
                self.app.notify, f"waiting for another jam process working on {_printable(str(self.root.path))}",
                title=VERBS.get(verb, verb), severity="warning", markup=False)

    def _do(self, verb: str, rels: list[str], session: TuiSession, worker):
        from jam_core.ops.common import Result

        if verb == "unpin":
            from jam_core.policy.pins import unpin

            done, not_pinned, held = unpin(self.root, rels)
            lines = [f"{_printable(r)} stays pinned through {_printable(h)}" for r, h in held]
            return f"unpinned {len(done)}", ("warning" if lines else "information"), lines
        if verb == "doctor":
            from jam_core.ops.doctor import doctor

            stubs, problems = 0, []
            for rel in rels:
                self._check(worker, session)
                res = doctor(self.root, rel, self.pm, session)
                stubs += res.stubs
                problems += [f"{p.kind}: {_printable(p.path)}: {p.detail}" for p in res.unfixed]
            if not problems:
                return f"doctor: {stubs} stubs checked, no problem", "information", []
            return f"doctor: {len(problems)} problems ({stubs} stubs checked)", "warning", problems
        if verb == "pin":
            from jam_core.policy.pins import pin

            pin(self.root, rels)
        if verb == "stash":
            from jam_core.ops.stash import stash as op
        else:
            from jam_core.ops.checkout import checkout as op
        total = Result()
        for rel in rels:
            self._check(worker, session)
            res = op(self.root, [rel], self.pm, session)
            total.done += res.done
            total.skipped += res.skipped
            total.failed += res.failed
            total.unchanged += res.unchanged
            if res.aborted:
                total.aborted = res.aborted
                break
        return self._describe(verb, total)

    @staticmethod
    def _check(worker, session: TuiSession) -> None:
        if worker.is_cancelled or session.cancelled:
            raise Cancelled()

    @staticmethod
    def _describe(verb: str, res) -> tuple[str, str, list[str]]:
        past = {"stash": "stashed", "fetch": "fetched", "pin": "pinned; fetched"}[verb]
        text = f"{past} {len(res.done)} files ({human(res.bytes)})"
        if res.unchanged:
            text += f", {res.unchanged} already done"
        lines = [f"failed: {_printable(p)}: {why}" for p, why in res.failed[:5]]
        lines += [f"skipped: {_printable(p)}: {why}" for p, why in res.skipped[:5]]
        if res.aborted:
            return f"{verb} stopped: {res.aborted}", "error", lines
        if res.failed:
            return text + f", {len(res.failed)} failed", "error", lines
        if res.skipped:
            return text + f", {len(res.skipped)} skipped", "warning", lines
        return text, "information", lines

    def on_action_done(self, m: ActionDone) -> None:
        self.busy = ""
        self.session = None
        self.query_one(StatusLine).stop()
        body = "\n".join([m.text] + m.lines[:5])
        self.app.notify(body, title=VERBS.get(m.verb, m.verb), severity=m.severity,
                        timeout=8 if m.severity == "information" else 15)
        self.query_one(Listing).clear_marks()
        self.reload(self.rel)

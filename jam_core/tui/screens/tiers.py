"""The tiers view (``t``): each remote's kind, tier, URL, whether it answers (checked in a
worker) and the objects and bytes it holds for this root (catalog)."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Static
from textual.worker import get_current_worker

from jam_core.tui.messages import HoldingsReady, RemoteChecked
from jam_core.units import human


class TiersScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,t", "close", "Back", id="tiers.back"),
        Binding("r", "refresh", "Check again", id="tiers.refresh"),
    ]
    DEFAULT_CSS = """
    TiersScreen > #title { dock: top; height: 1; background: $primary; text-style: bold; padding: 0 1; }
    TiersScreen > DataTable { height: 1fr; }
    TiersScreen > KeysBar { dock: none; }
    TiersScreen > #note { dock: bottom; height: 1; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, root, pm) -> None:
        super().__init__()
        self.root = root
        self.pm = pm
        self.remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
        self.reach: dict[str, str] = {}
        self.held: dict = {}

    def compose(self) -> ComposeResult:
        from jam_core.tui.widgets.listing import _printable

        yield Static(Text(f"Tiers of {_printable(self.root.path.name)}"), id="title")
        table = DataTable(cursor_type="row", zebra_stripes=True)
        for col in ("remote", "kind", "tier", "reachable", "objects", "bytes", "url"):
            table.add_column(col, key=col)
        for r in self.remotes:
            table.add_row(Text(r.name), Text(r.kind), str(r.tier), "checking…", "…", "…", Text(_printable(r.url)),
                          key=r.name)
        yield table
        yield Static("" if self.remotes else "no remote: add one with `jam remote add NAME URL`", id="note")
        from jam_core.tui.widgets.keys_bar import KeysBar

        yield KeysBar([*self.BINDINGS, *type(self.app).BINDINGS], id="keys")

    def on_screen_resume(self) -> None:
        self.action_refresh()  # each time it is shown (it is made once and kept)

    def action_refresh(self) -> None:
        table = self.query_one(DataTable)
        for r in self.remotes:
            table.update_cell(r.name, "reachable", "checking…")
        self.check()

    @work(thread=True, exclusive=True, group="tiers")
    def check(self) -> None:
        from jam_core.errors import describe
        from jam_core.model import Session
        from jam_core.ops import browse

        worker = get_current_worker()
        try:
            held = browse.holdings(self.root)
        except Exception:
            held = {}
        self.post_message(HoldingsReady(held))
        with Session() as session:
            for r in self.remotes:
                if worker.is_cancelled:
                    return
                try:
                    self.pm.hook.check_remote(remote=r, session=session, create=False)
                    self.post_message(RemoteChecked(r.name, True, "yes"))
                except Exception as exc:  # noqa: BLE001  a remote down is a row, never a crash
                    self.post_message(RemoteChecked(r.name, False, describe(exc)))

    def on_remote_checked(self, m: RemoteChecked) -> None:
        self.reach[m.name] = m.detail
        text = "yes" if m.ok else "NO"
        self.query_one(DataTable).update_cell(m.name, "reachable", text)
        if not m.ok:
            # (Screen.notify's markup=True default would override the app's: a path is text)
            self.notify(f"{m.name}: {m.detail}", title="remote down", severity="warning", markup=False)

    def on_holdings_ready(self, m: HoldingsReady) -> None:
        from jam_core.ops.browse import Holding

        table = self.query_one(DataTable)
        for r in self.remotes:
            h = m.holdings.get(r.name, Holding())
            table.update_cell(r.name, "objects", str(h.objects))
            table.update_cell(r.name, "bytes", human(h.bytes))

    def action_close(self) -> None:
        self.dismiss(None)

"""The keys (``?``): every binding of the main screen and the app, with its description."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

EXTRA = [
    ("↑ ↓ PgUp PgDn Home End", "move"),
    ("space", "mark / unmark the row (the line above the footer shows count and bytes)"),
    ("Esc", "cancel a transfer · clear the filter · close the info pane"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="help.close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; background: $background; }
    HelpScreen > VerticalScroll { width: 74; height: 20; border: thick $primary; background: $surface;
                                  padding: 0 1; }
    """

    def __init__(self, bindings: list[Binding]) -> None:
        super().__init__()
        self.keys = bindings

    def compose(self) -> ComposeResult:
        lines = ["[b]jam tui: keys[/b]", ""]
        for b in self.keys:
            key = b.key_display or b.key.replace("question_mark", "?").replace("slash", "/") \
                .replace("backspace", "⌫").replace("enter", "Enter")
            lines.append(f"  [b]{key:<14}[/b] {b.description}")
        lines += [f"  [b]{k:<14}[/b] {d}" for k, d in EXTRA]
        lines += ["", "Directories and marked rows ask first; a single file acts at once.", "Esc closes this."]
        with VerticalScroll():
            yield Static("\n".join(lines))

    def action_close(self) -> None:
        self.dismiss(None)

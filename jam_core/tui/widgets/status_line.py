"""The line above the footer: the marked rows (count and bytes), and a transfer's progress bar."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from jam_core.units import human


class StatusLine(Horizontal):
    DEFAULT_CSS = """
    StatusLine { height: 1; padding: 0 1; }
    StatusLine > #marks { width: auto; min-width: 20; }
    StatusLine > #verb { width: auto; padding: 0 1; }
    StatusLine > ProgressBar { width: 1fr; display: none; }
    StatusLine.-busy > ProgressBar { display: block; }
    """

    def compose(self) -> ComposeResult:
        yield Label("no marks", id="marks")
        yield Label("", id="verb")
        yield ProgressBar(total=None, show_eta=False, id="progress")

    def show_marks(self, count: int, nbytes: int) -> None:
        text = "no marks" if not count else f"{count} marked ({human(nbytes)})"
        self.query_one("#marks", Label).update(text)

    def start(self, verb: str) -> None:
        self.add_class("-busy")
        self.query_one("#verb", Label).update(f"{verb}… (Esc cancels)")
        self.query_one(ProgressBar).update(total=None, progress=0)

    def progress(self, done: int, total: int) -> None:
        self.query_one(ProgressBar).update(total=max(total, done, 1), progress=done)

    def stop(self) -> None:
        self.remove_class("-busy")
        self.query_one("#verb", Label).update("")

"""The info pane (``i``): one entry's stub metadata, the pins covering it and the policies'
reasons to stash it now. Shows what it is given."""

from __future__ import annotations

import time

from textual.widgets import Static

from jam_core.units import human


class InfoPane(Static):
    DEFAULT_CSS = """
    InfoPane { dock: right; width: 36; height: 1fr; border-left: solid $primary; padding: 0 1; display: none; }
    InfoPane.-shown { display: block; }
    """

    def show_details(self, d, reasons: list[str], totals=None) -> None:
        """Every piece is text, never markup: names, the header's metadata (a stub carried over
        from elsewhere says what it likes) and the policies' reasons are appended to a
        ``rich.text.Text`` as they are, control characters replaced."""
        from rich.text import Text

        from jam_core.tui.widgets.listing import _printable

        out = Text(no_wrap=False)
        out.append(_printable(d.rel.rpartition('/')[2] or d.rel), style="bold")

        def line(label: str, value) -> None:
            out.append("\n" + label)
            out.append(_printable(str(value)))

        line("kind    ", d.kind)
        if d.state:
            line("state   ", d.state)
        if d.kind == "file":
            line("size    ", f"{human(d.size)} ({d.size} B)")
        if d.mode:
            line("mode    ", f"{d.mode:04o}")
        if d.mtime_ns:
            line("mtime   ", time.strftime("%Y-%m-%d %H:%M", time.localtime(d.mtime_ns / 1e9)))
        if d.oid:
            line("id      ", f"{d.oid[:22]}…")
        if d.stashed_at:
            line("stashed ", d.stashed_at)
        if d.oid or d.remotes:
            line("remotes ", ", ".join(str(r) for r in d.remotes) or "none known")
        if totals is not None:
            line("files   ", f"{totals.files} ({totals.stubs} stubs)")
            line("true    ", human(totals.size))
            line("local   ", human(totals.local))
        if d.problem:
            line("problem ", d.problem)
        line("pins    ", ", ".join(d.pins) or "none")
        out.append("\npolicies:")
        for r in reasons or ["would not stash it now"]:
            line("  ", r)
        self.update(out)

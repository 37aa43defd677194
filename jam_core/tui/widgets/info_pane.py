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
        from jam_core.tui.widgets.listing import _printable

        lines = [f"[b]{_escape(_printable(d.rel.rpartition('/')[2] or d.rel))}[/b]", f"kind    {d.kind}"]
        if d.state:
            lines.append(f"state   {d.state}")
        if d.kind == "file":
            lines.append(f"size    {human(d.size)} ({d.size} B)")
        if d.mode:
            lines.append(f"mode    {d.mode:04o}")
        if d.mtime_ns:
            lines.append("mtime   " + time.strftime("%Y-%m-%d %H:%M", time.localtime(d.mtime_ns / 1e9)))
        if d.oid:
            lines.append(f"id      {d.oid[:22]}…")
        if d.stashed_at:
            lines.append(f"stashed {d.stashed_at}")
        if d.oid or d.remotes:
            lines.append("remotes " + (", ".join(d.remotes) or "none known"))
        if totals is not None:
            lines.append(f"files   {totals.files} ({totals.stubs} stubs)")
            lines.append(f"true    {human(totals.size)}")
            lines.append(f"local   {human(totals.local)}")
        if d.problem:
            lines.append(f"problem {_escape(d.problem)}")
        lines.append("pins    " + (", ".join(_escape(_printable(p)) for p in d.pins) or "none"))
        lines.append("policies:")
        lines.extend(f"  {_escape(r)}" for r in reasons) if reasons else lines.append("  would not stash it now")
        self.update("\n".join(lines))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)

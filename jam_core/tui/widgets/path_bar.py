"""The path of the directory shown, always on the top line."""

from __future__ import annotations

from textual.widgets import Static


class PathBar(Static):
    DEFAULT_CSS = """
    PathBar { dock: top; height: 1; background: $primary; color: $text; text-style: bold; padding: 0 1; }
    """

    def show_path(self, root_name: str, rel: str) -> None:
        from jam_core.tui.widgets.listing import _printable

        where = root_name if rel in ("", ".") else f"{root_name}/{rel}"
        from rich.text import Text

        self.update(Text(_printable(where) + "/"))  # a name is text, never markup

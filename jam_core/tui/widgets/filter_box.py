"""The filter box (``/``): typing narrows the listing; Enter closes it; Escape clears it."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input

from jam_core.tui.messages import FilterCleared


class FilterBox(Input):
    BINDINGS = [Binding("escape", "clear", "Clear filter", id="filter.clear")]
    DEFAULT_CSS = """
    FilterBox { height: 1; border: none; padding: 0 1; display: none; }
    FilterBox.-shown { display: block; }
    """

    def action_clear(self) -> None:
        self.value = ""
        self.post_message(FilterCleared())

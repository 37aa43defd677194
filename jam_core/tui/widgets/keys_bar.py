"""The keys line at the bottom: the screen's shown bindings, drawn as one line of text.

Textual's Footer is a container of one widget per key that recomposes whenever the focus
moves (the filter box opened and closed, a screen shown and closed): measured here, 100-400 ms
per such key on a loaded 2-core machine. This line is one widget whose text never changes, so
showing and closing things costs it nothing."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class KeysBar(Static):
    COMPONENT_CLASSES = {"keys-bar--key"}
    can_focus = False
    DEFAULT_CSS = """
    KeysBar { dock: bottom; height: 1; background: $footer-background; color: $footer-foreground; }
    KeysBar > .keys-bar--key { color: $footer-key-foreground; text-style: bold; }
    """

    def __init__(self, bindings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys = [(b.key_display or b.key.split(",")[0], b.description) for b in bindings if b.show]

    def render(self) -> Text:
        key_style = self.get_component_rich_style("keys-bar--key")
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        for key, description in self.keys:
            text.append(f" {key}", style=key_style)
            text.append(f" {description}")
        return text

"""The listing: one line per entry of a directory, drawn with the Line API (only the visible
lines are rendered, so 100,000 rows cost what 20 do). Sorting, filtering, the cursor and the
marks live here; no I/O."""

from __future__ import annotations

import time

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from jam_core.tui.messages import Highlighted, MarksChanged
from jam_core.units import human

SORTS = ("name", "size", "local", "used")
SORT_TITLES = {"name": "name", "size": "size", "local": "local bytes", "used": "last use"}
STATE_LABEL = {"local": "local", "stub": "stub", "dirty": "dirty", "bad": "broken", "partly": "partly",
               "stubs": "stubs", "empty": "empty", "": "…"}


def _size(n: int) -> str:
    return human(n).replace(" ", "")


def _used(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t)) if t > 0 else "-"


def _fit(text: str, width: int, right: bool = False) -> str:
    if width <= 0:
        return ""
    if len(text) > width:
        return text[: width - 1] + "…" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def _printable(name: str) -> str:
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else "?" for c in text)


class Listing(ScrollView, can_focus=True):
    """Rows of ``jam_core.ops.browse.Row``; the header line stays on top."""

    inherit_bindings = False
    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False, id="listing.up"),
        Binding("down,j", "move(1)", "Down", show=False, id="listing.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="listing.pageup"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="listing.pagedown"),
        Binding("home", "edge(0)", "First", show=False, id="listing.first"),
        Binding("end", "edge(1)", "Last", show=False, id="listing.last"),
        Binding("space", "mark", "Mark", id="listing.mark"),
    ]
    COMPONENT_CLASSES = {"listing--header", "listing--cursor", "listing--marked", "listing--dir",
                         "listing--stub", "listing--warn"}
    DEFAULT_CSS = """
    Listing { height: 1fr; scrollbar-size-vertical: 1; overflow-x: hidden; }
    Listing > .listing--header { text-style: bold; background: $panel; }
    Listing > .listing--cursor { background: $accent 50%; text-style: bold; }
    Listing:focus > .listing--cursor { background: $accent; }
    Listing > .listing--marked { color: $warning; text-style: bold; }
    Listing > .listing--dir { color: $text; text-style: bold; }
    Listing > .listing--stub { color: $text-muted; }
    Listing > .listing--warn { color: $error; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows: list = []
        self.view: list = []
        self.cursor = 0
        self.marks: dict[str, object] = {}
        self.sort = "name"
        self.reverse = False
        self.disk_sizes = False  # the size column: true size, or the bytes taken on this disk
        self.filter = ""
        self._said_marks: tuple | None = None  # the last MarksChanged posted
        self._said_row = False  # the row of the last Highlighted posted (False: none yet)

    # -- data ---------------------------------------------------------------------------------
    def set_rows(self, rows: list, focus: str = "") -> None:
        """New rows (another directory, or the same one reloaded): marks that still exist stay."""
        keep = self.current.name if (self.current is not None and not focus) else focus
        self.rows = rows
        by_rel = {r.rel: r for r in rows}
        self.marks = {rel: by_rel[rel] for rel in self.marks if rel in by_rel}
        self._rebuild(keep)
        self._marks_changed()

    def update_rows(self) -> None:
        """The rows' values changed (totals arrived): re-sort, keep the cursor on its row."""
        self._rebuild(self.current.name if self.current is not None else "")
        self._marks_changed()

    def set_filter(self, text: str) -> None:
        self.filter = text
        self._rebuild("")
        self.cursor = 0
        self._moved()

    def set_sort(self, key: str) -> None:
        if key == self.sort:
            self.reverse = not self.reverse
        else:
            self.sort, self.reverse = key, key != "name"  # sizes and dates: biggest, newest first
        self.update_rows()

    def cycle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self.reverse = self.sort != "name"
        self.update_rows()

    def toggle_sizes(self) -> None:
        self.disk_sizes = not self.disk_sizes
        self.update_rows()

    def _key(self):
        dirs_first = lambda r: 0 if r.is_dir else 1
        if self.sort == "size":
            return lambda r: (r.disk if self.disk_sizes else r.size, r.name)
        if self.sort == "local":
            return lambda r: (r.local, r.name)
        if self.sort == "used":
            return lambda r: (r.last_used, r.name)
        return lambda r: (dirs_first(r), r.name)

    def _rebuild(self, keep: str) -> None:
        text = self.filter.lower()
        view = [r for r in self.rows if text in r.name.lower()] if text else list(self.rows)
        view.sort(key=self._key(), reverse=self.reverse)
        self.view = view
        self.cursor = 0
        if keep:
            for i, r in enumerate(view):
                if r.name == keep:
                    self.cursor = i
                    break
        self.virtual_size = Size(self.size.width, len(view) + 1)
        self._follow()
        self.refresh()
        self._moved()

    @property
    def current(self):
        return self.view[self.cursor] if 0 <= self.cursor < len(self.view) else None

    def marked_bytes(self) -> int:
        return sum(r.size for r in self.marks.values())

    def _marks_changed(self) -> None:
        said = (len(self.marks), self.marked_bytes())
        if said != self._said_marks:  # a re-sort changes nothing here: no message, no relayout
            self._said_marks = said
            self.post_message(MarksChanged(*said))

    def _moved(self) -> None:
        row = self.current
        if row is not self._said_row:  # the same row re-sorted: the info pane has nothing new
            self._said_row = row
            self.post_message(Highlighted(row))

    # -- keys ---------------------------------------------------------------------------------
    def _page(self) -> int:
        return max(1, self.size.height - 1)

    def _follow(self) -> None:
        top, page = round(self.scroll_y), self._page()
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + page:
            self.scroll_to(y=self.cursor - page + 1, animate=False, immediate=True)

    def move_to(self, index: int) -> None:
        if not self.view:
            return
        index = max(0, min(len(self.view) - 1, index))
        if index != self.cursor:
            self.cursor = index
            self._follow()
            self.refresh()
            self._moved()

    def action_move(self, delta: int) -> None:
        self.move_to(self.cursor + delta)

    def action_page(self, delta: int) -> None:
        self.move_to(self.cursor + delta * self._page())

    def action_edge(self, end: int) -> None:
        self.move_to(len(self.view) - 1 if end else 0)

    def action_mark(self) -> None:
        row = self.current
        if row is None:
            return
        if row.rel in self.marks:
            del self.marks[row.rel]
        else:
            self.marks[row.rel] = row
        self._marks_changed()
        self.move_to(self.cursor + 1)
        self.refresh()

    def clear_marks(self) -> None:
        self.marks = {}
        self._marks_changed()
        self.refresh()

    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, len(self.view) + 1)
        self._follow()

    # -- drawing ------------------------------------------------------------------------------
    def _widths(self, width: int) -> tuple[int, int]:
        fixed = 2 + 7 + 9 + 9 + 11 + 5  # mark, state, size, local, used, separators
        tiers = max(8, (width - fixed) // 4)
        return max(8, width - fixed - tiers), tiers

    def header_text(self, width: int) -> str:
        name_w, tiers_w = self._widths(width)
        arrow = "↓" if self.reverse else "↑"
        size_t = "disk" if self.disk_sizes else "size"
        titles = {"name": "name", "size": size_t, "local": "local", "used": "used"}
        titles[self.sort] += arrow
        return "  " + " ".join([_fit(titles["name"], name_w), _fit("state", 7), _fit(titles["size"], 9, True),
                                _fit(titles["local"], 9, True), _fit(titles["used"], 11, True),
                                _fit("tiers", tiers_w)])

    def row_text(self, row, width: int) -> str:
        name_w, tiers_w = self._widths(width)
        mark = "*" if row.rel in self.marks else " "
        pin = "^" if row.pinned else " "
        name = _printable(row.name) + ("/" if row.is_dir else "@" if row.kind == "link" else "")
        if row.is_dir:
            state = STATE_LABEL.get(row.state, row.state) if row.totals else "…"
            size = _size(row.disk if self.disk_sizes else row.size) if row.totals else "…"
            local = _size(row.local) if row.totals else "…"
            tiers = f"{row.files}f {row.stubs}s" if row.totals else f"…f {row.stubs}s" if row.stubs_known else ""
        elif row.kind == "file":
            state = STATE_LABEL.get(row.state, row.state)
            size, local = _size(row.disk if self.disk_sizes else row.size), _size(row.local)
            tiers = ",".join(row.remotes)
        else:
            state, size, local, tiers = row.kind, "", "", ""
        return mark + pin + " ".join([_fit(name, name_w), _fit(state, 7), _fit(size, 9, True),
                                      _fit(local, 9, True), _fit(_used(row.last_used), 11, True),
                                      _fit(tiers, tiers_w)])

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        if y == 0:
            style = base + self.get_component_rich_style("listing--header")
            return Strip([Segment(_fit(self.header_text(width), width), style)], width)
        index = round(self.scroll_y) + y - 1
        if index >= len(self.view):
            return Strip.blank(width, base)
        row = self.view[index]
        style: Style = base
        if row.is_dir:
            style += self.get_component_rich_style("listing--dir")
        elif row.state in ("stub",):
            style += self.get_component_rich_style("listing--stub")
        elif row.state in ("dirty", "bad"):
            style += self.get_component_rich_style("listing--warn")
        if row.rel in self.marks:
            style += self.get_component_rich_style("listing--marked")
        if index == self.cursor:
            style += self.get_component_rich_style("listing--cursor")
        return Strip([Segment(_fit(self.row_text(row, width), width), style)], width)

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        self.refresh()

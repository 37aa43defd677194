"""One line on the whole root: content here, content stashed, free space, what policies would do."""

from __future__ import annotations

from textual.widgets import Static

from jam_core.units import human


class SummaryBar(Static):
    DEFAULT_CSS = """
    SummaryBar { height: 1; background: $panel; padding: 0 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("local …  stashed …  free …", **kwargs)
        self.summary = None
        self.plan_text = "policies: …"

    def show_summary(self, summary) -> None:
        self.summary = summary
        self._draw()

    def show_plan(self, plan, error: str = "") -> None:
        if error:
            self.plan_text = "policies: none set" if "no policy is configured" in error else "policies: error"
        elif not plan.items:
            self.plan_text = "policies: nothing to stash"
        else:
            self.plan_text = f"policies would stash {len(plan.items)} ({human(plan.bytes)})"
        self._draw()

    def _draw(self) -> None:
        s = self.summary
        head = "local …  stashed …  free …" if s is None else \
            f"local {human(s.local_bytes)}  stashed {human(s.stashed_bytes)}  free {human(s.free)}"
        self.update(f"{head}  │ {self.plan_text}")

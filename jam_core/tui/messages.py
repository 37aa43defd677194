"""Messages the TUI's workers and widgets post (dataclasses: what happened, nothing more)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class Listed(Message):
    """The entries of directory ``rel`` (``browse.Row``s, totals not yet known)."""

    rel: str
    rows: list
    focus: str = ""  # the name to put the cursor on


@dataclass
class CatalogTotals(Message):
    """Per child directory of ``rel``: the stubs below it and their bytes, from the catalog
    (``browse.catalog_totals``), before a scan's full totals."""

    rel: str
    known: dict


@dataclass
class TotalsReady(Message):
    """Per-child totals of directory ``rel`` (``browse.Totals``)."""

    rel: str
    totals: Any


@dataclass
class Scanned(Message):
    """One status scan of the whole root (``status.Status``) and its summary (``browse.Summary``)."""

    tree: Any
    summary: Any


@dataclass
class PlanReady(Message):
    """What the configured policies would stash now (``plan.Plan``), or why not (``error``)."""

    plan: Any = None
    error: str = ""


@dataclass
class DetailsReady(Message):
    details: Any  # browse.Details


@dataclass
class LoadFailed(Message):
    rel: str
    error: str


@dataclass
class Progress(Message):
    """Bytes of work done and the total known so far (the core counts each byte twice)."""

    done: int
    total: int


@dataclass
class ActionDone(Message):
    """An action finished (or stopped): one line for the user and its severity."""

    verb: str
    text: str
    severity: str = "information"
    lines: list[str] = field(default_factory=list)


@dataclass
class RemoteChecked(Message):
    name: str
    ok: bool
    detail: str


@dataclass
class HoldingsReady(Message):
    holdings: dict


@dataclass
class Highlighted(Message):
    """The cursor of the listing moved to ``row`` (None: nothing listed)."""

    row: Any


@dataclass
class MarksChanged(Message):
    count: int
    bytes: int


@dataclass
class FilterCleared(Message):
    """Escape in the filter box: the filter is gone."""

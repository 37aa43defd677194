"""Helpers shared by the command modules: roots from paths, the plugin manager, output."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import click

from jam_core.units import human  # noqa: F401  (the CLI's sizes)



def plugin_manager():
    from jam_core.manager import make_plugin_manager

    return make_plugin_manager()


def root_and_rels(paths: Iterable[str]):
    """The root holding every path (relative to the cwd) and the paths relative to it."""
    from jam_core.root import Root

    paths = list(paths) or ["."]
    root = Root.find(paths[0])
    return root, [root.rel(p) for p in paths]


def show_path(rel: str) -> str:
    """A path as one printable line: undecodable bytes and control characters escaped."""
    text = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        text = text.encode("unicode_escape").decode("ascii")
    return text


@contextmanager
def session(verb: str) -> Iterator:
    """A Session whose progress shows on a terminal (a bar, percent, time left), silent when piped.

    The core counts each byte twice (read and hashed, then stored; or fetched, then verified),
    so the bar shows work done rather than bytes."""
    from jam_core.model import Session

    if not sys.stderr.isatty():
        with Session() as s:
            yield s
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(verb), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                        transient=True, console=_stderr_console())
    task = progress.add_task(verb, total=None)
    with progress, Session(progress=lambda n: progress.advance(task, n),
                           total=lambda t: progress.update(task, total=t)) as s:
        yield s


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def report(result, verb: str, noun_done: str, quiet: bool = False, max_lines: int = 20) -> None:
    """Print what an operation did: failures and skips one line each (capped), then a summary."""
    for items, label in ((result.failed, "failed"), (result.skipped, "skipped")):
        for rel, why in items[:max_lines]:
            click.echo(f"jam: {label}: {show_path(rel)}: {why}", err=True)
        if len(items) > max_lines:
            click.echo(f"jam: ... and {len(items) - max_lines} more {label}", err=True)
    if result.aborted:
        click.echo(f"jam: stopped: {result.aborted}", err=True)
    if not quiet:
        parts = [f"{verb} {len(result.done)} file{'s' if len(result.done) != 1 else ''} ({human(result.bytes)} {noun_done})"]
        if result.unchanged:
            parts.append(f"{result.unchanged} already done")
        if result.skipped:
            parts.append(f"{len(result.skipped)} skipped")
        if result.failed:
            parts.append(f"{len(result.failed)} failed")
        click.echo(", ".join(parts))

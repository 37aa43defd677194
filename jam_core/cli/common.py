"""Helpers shared by the command modules: roots from paths, the plugin manager, output.

No click at module level: the cd hook's fetch (jam_core/cli/hook.py) uses these without it."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from jam_core.units import human  # noqa: F401  (the CLI's sizes)

_LAST_PM = None


def plugin_manager(fetch_config=None):
    """The plugin manager; one line on stderr for each third-party plugin that was skipped.

    ``fetch_config`` (a root's merged config): the manager for fetching in that root, which
    is the built-in dir backend alone when that is all the root's remotes and policies need
    (``jam_core.manager.fetch_plugin_manager``; the cd hook's fetch)."""
    global _LAST_PM
    from jam_core.manager import broken_plugins, fetch_plugin_manager, make_plugin_manager

    pm = make_plugin_manager() if fetch_config is None else fetch_plugin_manager(fetch_config)
    for b in broken_plugins(pm):
        print(f"jam: plugin {show_text(b['name'])} skipped: {show_text(b['reason'])} "
              f"(block it with JAM_BLOCK_PLUGINS={b['name']})", file=sys.stderr, flush=True)
    _LAST_PM = pm
    return pm


def last_plugin_manager():
    """The plugin manager this command built, if any (to name a plugin whose hook raised)."""
    return _LAST_PM


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 file``, ``2 files``, ``0 files`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _short(path: str, limit: int = 120) -> str:
    text = show_path(path)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_path(path: str) -> None:
    """A path named on the command line must exist (the entry itself, not what a symlink
    points to): a usage error (exit 2) otherwise, one line, never silence."""
    from jam_core.errors import UsageError

    try:
        os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"{_short(path)}: no such file or directory") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{_short(path)}: file name too long (longer than this system allows)") from None
        if exc.errno == errno.ENOTDIR:
            raise UsageError(f"{_short(path)}: no such file or directory (a part of it is not a directory)") from None
        raise UsageError(f"{_short(path)}: {exc.strerror or exc}") from None
    except ValueError:  # an embedded NUL byte
        raise UsageError(f"{_short(path)}: not a valid path") from None


def root_and_rels(paths: Iterable[str]):
    """The root holding every path (relative to the cwd) and the paths relative to it.

    Every path must exist (UsageError, exit 2, naming it); the caller decides what no path
    means (``status`` and ``doctor`` default to ``.``; ``stash`` and ``checkout`` need one)."""
    from jam_core.errors import UsageError
    from jam_core.root import Root

    paths = list(paths)
    if not paths:
        raise UsageError("name a file or directory (`.` is the current directory)")
    try:
        root = Root.find(paths[0])  # outside any root is the first thing to say
    except (OSError, ValueError):  # a name too long to look up: check_path says so
        check_path(paths[0])
        raise
    for p in paths:
        check_path(p)
    return root, [root.rel(p) for p in paths]


def show_text(text: str) -> str:
    """Text jam did not write (a name, a remote's message, a snapshot's message, a URL) as one
    line a terminal shows and never acts on: every character that is not printable (C0/C1
    controls, DEL, bidi overrides and isolates, line and paragraph separators) escaped
    (``\\x1b``, ``\\u202e``), an undecodable byte (a surrogate) as ``\\xHH``; when anything
    is escaped, a backslash is doubled so the escapes read back unambiguously."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        elif "\udc80" <= c <= "\udcff":  # an undecodable byte (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif 0xD800 <= ord(c) <= 0xDFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def show_path(rel: str) -> str:
    """A path as one printable line: undecodable bytes and non-printable characters escaped
    (``show_text``)."""
    return show_text(rel)


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
    import click

    for items, label in ((result.failed, "failed"), (result.skipped, "skipped")):
        for rel, why in items[:max_lines]:
            click.echo(f"jam: {label}: {show_path(rel)}: {show_text(why)}", err=True)
        if len(items) > max_lines:
            click.echo(f"jam: ... and {len(items) - max_lines} more {label}", err=True)
    if result.aborted:
        click.echo(f"jam: stopped: {show_text(result.aborted)}", err=True)
    if not quiet:
        parts = [f"{verb} {plural(len(result.done), 'file')} ({human(result.bytes)} {noun_done})"]
        if result.unchanged:
            parts.append(f"{result.unchanged} already done")
        if result.skipped:
            parts.append(f"{len(result.skipped)} skipped")
        if result.failed:
            parts.append(f"{len(result.failed)} failed")
        click.echo(", ".join(parts))

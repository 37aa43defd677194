"""`jam tui [PATH]`: the Textual app (textual is imported only here, when it starts)."""

from __future__ import annotations

import click

from jam_core.cli import main


def run_tui(path: str = ".") -> int:
    """Open the TUI on PATH (a directory inside a root; a file opens its directory)."""
    import os

    from jam_core.cli.common import check_path, plugin_manager
    from jam_core.errors import UsageError
    from jam_core.root import Root

    check_path(path)
    root = Root.find(path)
    rel = root.rel(path)
    if rel != "." and not os.path.isdir(root.abs(rel)):
        rel = rel.rpartition("/")[0] or "."
    try:
        os.close(_open_checked(root, rel))
    except OSError as exc:
        raise UsageError(f"{path}: cannot be listed: {exc.strerror or exc}") from None
    pm = plugin_manager()
    from jam_core.tui.app import make_app

    code = make_app(root, rel, pm).run()
    return code or 0


def _open_checked(root, rel: str) -> int:
    """The directory by descriptor from the root (a component that is a symlink is refused)."""
    import os

    from jam_core.fs import open_dir

    fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_dir(fd, rel)
    finally:
        os.close(fd)


@main.command()
@click.argument("path", default=".", type=click.Path())
def tui(path: str) -> None:
    """Browse the root around PATH (default: here): what is on this disk, what only on remotes,
    and where; fetch, stash, pin and check from it (`?` lists the keys, `q` quits)."""
    raise SystemExit(run_tui(path))

"""``jam daemon``: on-access hydration (Linux >= 6.14 fanotify pre-content events)."""

from __future__ import annotations

import click

from jam_core.cli import main


@main.command()
@click.argument("roots", nargs=-1, type=click.Path())
@click.option("--timeout", default=120.0, show_default=True, metavar="SECONDS",
              help="A fetch that takes longer answers its readers EAGAIN (try again).")
def daemon(roots: tuple[str, ...], timeout: float) -> None:
    """Fill stubs in the moment any program opens them (foreground; stop with SIGTERM or ^C).

    Marks every stub of ROOTS (default: the root around the current directory); `cat`, `cp`,
    editors, mmap and exec of a stub then see its real bytes. Needs root (CAP_SYS_ADMIN) and
    Linux >= 6.14 on ext4, xfs or btrfs."""
    import os

    from jam_core.daemon.fanotify import probe
    from jam_core.daemon.supervisor import Supervisor
    from jam_core.errors import JamError, UsageError
    from jam_core.root import Root

    if not 0 < timeout < float("inf"):  # (nan fails both comparisons)
        raise UsageError("--timeout must be a positive number of seconds")
    found = []
    for r in roots or (".",):
        root = Root.find(r)
        if root.path not in found:
            found.append(root.path)
    missing = probe()
    if missing is not None:
        raise JamError(f"on-access hydration is not available: {missing}")
    # the real paths: the kernel names an event's file by its real path
    Supervisor([type(p)(os.path.realpath(p)) for p in found], timeout).run()

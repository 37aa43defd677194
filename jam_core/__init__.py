"""jam: keep a directory tree whole while most of its bytes live on remotes.

A plugin writes ``from jam_core import hookimpl``. Everything the command line does is a
function of this package (see ``jam_core.ops``); the CLI only wraps it.
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "jam"
hookimpl = pluggy.HookimplMarker(PROJECT)

from jam_core.errors import JamError, RemoteError, UsageError  # noqa: E402
from jam_core.model import FileRecord, Nomination, Remote, Session  # noqa: E402

__all__ = [
    "PROJECT",
    "FileRecord",
    "JamError",
    "Nomination",
    "Remote",
    "RemoteError",
    "Session",
    "UsageError",
    "__version__",
    "hookimpl",
]

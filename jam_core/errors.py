"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""

import errno


class JamError(Exception):
    """A problem explained in one line for the user. ``exit_code`` follows PRODUCT.md."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(JamError):
    """The user asked for something impossible: bad path, unknown remote, bad config."""

    exit_code = 2


class RemoteError(JamError):
    """A remote is missing, unreachable, full, or refused an operation."""

    exit_code = 1


class IntegrityError(JamError):
    """Content did not match its id: a corrupt object or a failed transfer."""

    exit_code = 1


def describe(exc: Exception) -> str:
    """One line for the user about ``exc`` (an OSError by its strerror, a full disk named)."""
    if isinstance(exc, OSError) and not isinstance(exc, JamError):
        if exc.errno == errno.ENOSPC:
            return f"no space left on the local disk ({exc.filename or 'the root'})"
        return exc.strerror or str(exc)
    return str(exc)

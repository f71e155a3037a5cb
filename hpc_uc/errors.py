"""Errors a user can fix, and how any error is reported in one line."""
from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or configuration: reported as one line, no traceback."""


def describe(exc: BaseException) -> str:
    """One line naming the error: the message for UserError, 'Type: message' otherwise."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, UserError):
        return text
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"disk full{where}: free some space and run again (earlier outputs are kept)"
    return f"{type(exc).__name__}: {text}"

"""Errors a user can fix, and how any error is reported in one line."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: reported as one line, no traceback."""


def describe(exc: BaseException) -> str:
    """One line naming the error: the message for UserError, 'Type: message' otherwise."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, UserError):
        return text
    return f"{type(exc).__name__}: {text}"

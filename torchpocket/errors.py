"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a name). Never a bug."""


class UnsupportedModel(UserError):
    """A learner cannot handle this architecture (it says which part and why)."""

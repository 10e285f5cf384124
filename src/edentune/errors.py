"""User-facing errors.

Anything a user can cause (bad config, malformed file, missing model) raises `EdentuneError`.
The CLI prints its message without a traceback and exits with `exit_code`; programming errors
still raise normally so they are not hidden.
"""

from __future__ import annotations


class EdentuneError(Exception):
    """A problem the user can fix. The message must say what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # message plus the remedy, one place for formatting
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(EdentuneError):
    """The run configuration is invalid."""


class DataError(EdentuneError):
    """Input data cannot be used."""

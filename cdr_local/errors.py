"""User-facing errors.

Anything the user can fix (bad flag, missing model, corrupt GGUF, unknown
pair) raises :class:`CdrError`; the CLI prints its message on one line and
exits with ``exit_code`` (2), never with a traceback.
"""

from __future__ import annotations


class CdrError(Exception):
    """An error the user caused or can fix; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModelError(CdrError):
    """A model file is missing, corrupt, or fails its sha256 check."""


class ConfigError(CdrError):
    """models.toml or a flag is invalid."""

"""Errors of the reward-model side."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model cannot be served; the message is the reason shown to operators and clients."""


class ItemError(Exception):
    """One item cannot be scored; the others in its batch still are.

    `code` is a stable machine-readable name (too_long, unsupported_content, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

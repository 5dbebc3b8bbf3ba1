"""Errors of the tool sandbox."""

from __future__ import annotations


class ToolError(Exception):
    """A tool call failed; the judge sees the message as the tool's answer.

    `code` is a stable machine-readable name: invalid_arguments, not_found, timeout, ...
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

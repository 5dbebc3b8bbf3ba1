"""Errors every layer shares: an item that cannot be scored, a tool call that failed, and the
HTTP error envelope every rmserve server answers with."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ItemError(Exception):
    """One item cannot be scored; the others in its batch still are.

    `code` is a stable machine-readable name (too_long, unsupported_content, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its constructor's arguments (across processes), not by its message alone.
        return type(self), (self.code, self.message), self.__dict__


class ToolError(Exception):
    """A tool call failed; the judge sees the message as the tool's answer.

    `code` is a stable machine-readable name: invalid_arguments, not_found, timeout, ...
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its constructor's arguments (across processes), not by its message alone.
        return type(self), (self.code, self.message), self.__dict__


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

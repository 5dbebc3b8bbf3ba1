"""What a trainer adapter does with an item the service could not score (an item error such as
a timeout, a judge output that did not parse or a sandbox failure; no score; a non-finite score):
raise, or - only when asked, with an explicit number - give that number and flag the item.
Never a silent default the policy would learn from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from rmserve.client.client import ScoreResult

ON_ERROR_ENV = "RMSERVE_ON_ERROR"
OnError = Literal["raise", "flag"]


class ItemFailed(Exception):
    """One item got no usable score; `type` and `message` say why (the service's item error)."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"rmserve could not score the item: {type}: {message}")
        self.type, self.message = type, message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its constructor's arguments (Ray hands it to the driver), not by str().
        return type(self), (self.type, self.message), self.__dict__

    @property
    def summary(self) -> str:
        """`type: message`, as adapters report it next to a flagged reward."""
        return f"{self.type}: {self.message}"


@dataclass(frozen=True)
class ErrorPolicy:
    """`error_score` None: a failed item raises ItemFailed; a number: the item gets it, flagged."""

    error_score: float | None = None

    def __post_init__(self) -> None:
        if self.error_score is not None and not math.isfinite(self.error_score):
            raise ValueError(f"error_score must be a finite number, got {self.error_score}")

    @property
    def raises(self) -> bool:
        return self.error_score is None

    @classmethod
    def parse(cls, on_error: object = "raise", error_score: object = None) -> ErrorPolicy:
        """From keyword arguments: on_error "raise" (default) or "flag" with a number."""
        if on_error == "raise":
            if error_score is not None:
                raise ValueError("error_score is used only with on_error='flag'")
            return cls()
        if on_error == "flag":
            if isinstance(error_score, bool) or not isinstance(error_score, int | float):
                raise ValueError(
                    "on_error='flag' needs an explicit error_score (the reward a failed item "
                    "gets, e.g. error_score=0.0); there is no default"
                )
            return cls(float(error_score))
        raise ValueError(f"on_error must be 'raise' or 'flag', got {on_error!r}")

    @classmethod
    def from_env(cls, value: str | None) -> ErrorPolicy:
        """From RMSERVE_ON_ERROR: unset or "raise", or the number a failed item gets."""
        if value is None or value.strip() in ("", "raise"):
            return cls()
        try:
            return cls(float(value))
        except ValueError:
            raise ValueError(
                f"{ON_ERROR_ENV} must be 'raise' or a number (the reward of a failed item), "
                f"got {value!r}"
            ) from None

    def reward(self, failure: ItemFailed) -> float:
        """The reward of a failed item: raise it, or the explicit error score."""
        if self.error_score is None:
            raise failure
        return self.error_score


def checked_score(result: ScoreResult) -> float | ItemFailed:
    """`result`'s score, or why it has no usable one."""
    if result.error is not None:
        return ItemFailed(result.error.type, result.error.message)
    if result.score is None:
        return ItemFailed("no_score", "the model returned no score")
    if not math.isfinite(result.score):
        return ItemFailed("invalid_score", f"the model returned the score {result.score}")
    return float(result.score)

"""Errors of the reward-model side."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model cannot be served; the message is the reason shown to operators and clients."""

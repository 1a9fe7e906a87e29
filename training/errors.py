"""Errors the trainer raises with a message that says what to do."""

from __future__ import annotations

import logging





log = logging.getLogger("tokenreduce.train")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (damaged or incompatible)."""

"""Errors the trainer raises with a message that says what to do."""

from __future__ import annotations

import logging

from configs import ConfigError

log = logging.getLogger("tokenreduce.train")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (damaged or incompatible)."""


class ConfigMismatchError(ConfigError):
    """A run resumed with a config that differs from its checkpoint's in fields that must not change."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM reached a training run (raised by the trainer's handler so that pending checkpoint saves finish)."""

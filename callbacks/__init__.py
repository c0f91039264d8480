"""Training-loop controllers and helpers."""

from callbacks.epoch_timer import EpochTimer

__all__ = ["EpochTimer"]

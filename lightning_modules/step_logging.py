"""Logging a training figure per step and as its epoch mean, correctly under DDP."""

from __future__ import annotations

import lightning as L
import torch


def log_step_and_epoch(module: L.LightningModule, figures: dict, batch_size: int) -> None:
    """``<name>_step`` every ``log_every_n_steps`` (this rank's value, no communication) and
    ``<name>_epoch``, the epoch mean reduced over DDP ranks once at the epoch's end. The epoch
    mean is logged even when a small cohort has fewer batches than the logging interval."""
    figures = {k: v.detach() if torch.is_tensor(v) else v for k, v in figures.items()}
    module.log_dict({f"{k}_step": v for k, v in figures.items()}, on_step=True, on_epoch=False, batch_size=batch_size)
    module.log_dict(
        {f"{k}_epoch": v for k, v in figures.items()},
        on_step=False,
        on_epoch=True,
        sync_dist=True,
        batch_size=batch_size,
    )

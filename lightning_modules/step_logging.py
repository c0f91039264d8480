"""Logging a training figure per step and as its epoch mean, correctly under DDP, cheaply.

Lightning's ``self.log`` costs about half a millisecond of Python per call (it re-homes its result
object on every call). A small model logging five loss terms per step, each as a step figure and
as an epoch mean, spent as long in ``self.log`` as in its forward and backward pass. So the step
figure is handed to Lightning only on the steps its logger writes (and the epoch's last), and the epoch mean is summed
here on the device and handed over once, at the epoch's last batch.
"""

from __future__ import annotations

import lightning as L
import torch

_SUMS = "_epoch_figure_sums"


def log_step_and_epoch(module: L.LightningModule, figures: dict, batch_size: int) -> None:
    """``<name>_step`` every ``log_every_n_steps`` and at the epoch's last batch (this rank's value,
    no communication; a progress bar shows it refreshed at that pace) and
    ``<name>_epoch``, the epoch mean weighted by batch size and reduced over DDP ranks once at the
    epoch's end (the same figure as ``self.log(..., on_epoch=True, sync_dist=True, batch_size=...)``).
    The epoch mean is logged even when a small cohort has fewer batches than the logging interval."""
    figures = {k: v.detach() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in figures.items()}
    trainer = _attached_trainer(module)
    if trainer is None:  # a step called by hand: hand both figures over as they are
        module.log_dict(
            {f"{k}_step": v for k, v in figures.items()}, on_step=True, on_epoch=False, batch_size=batch_size
        )
        module.log_dict(
            {f"{k}_epoch": v for k, v in figures.items()}, on_step=False, on_epoch=True, batch_size=batch_size
        )
        return
    # the last batch too, so that callback_metrics end each epoch holding its last step's figures
    if _step_is_written(trainer) or trainer.is_last_batch:
        steps = {f"{k}_step": v for k, v in figures.items()}
        module.log_dict(steps, on_step=True, on_epoch=False, batch_size=batch_size)
    owner, epoch, sums = module.__dict__.get(_SUMS, (None, None, {}))
    if owner is not trainer or epoch != trainer.current_epoch:  # left by a fit or epoch that broke off
        owner, epoch, sums = trainer, trainer.current_epoch, {}
    for name, value in figures.items():
        total, weight = sums.get(name, (0.0, 0))
        sums[name] = (total + value.float() * batch_size, weight + batch_size)
    module.__dict__[_SUMS] = (owner, epoch, sums)
    if trainer.is_last_batch:
        log_epoch_means(module)


def log_epoch_means(module: L.LightningModule) -> None:
    """Hands the epoch means summed so far to Lightning (``<name>_epoch``) and starts over. Called at
    the last batch, and by :class:`~lightning_modules.base.MedRecModule` at the epoch's end for an
    epoch cut short (``max_steps``, a stop requested mid-epoch)."""
    *_, sums = module.__dict__.pop(_SUMS, (None, None, {}))
    for name, (total, weight) in sums.items():
        # Lightning keeps value × batch_size and sums both over ranks: the global weighted mean
        module.log(f"{name}_epoch", total / weight, on_step=False, on_epoch=True, sync_dist=True, batch_size=weight)


def _attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    try:
        return module.trainer
    except RuntimeError:  # Lightning's "not attached to a Trainer"
        return None


def _step_is_written(trainer: L.Trainer) -> bool:
    """Whether the logger writes this step's figures (Lightning's own rule: every
    ``log_every_n_steps`` optimizer steps, and when the fit is stopping); True if unknown."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True)) or bool(trainer.fast_dev_run)

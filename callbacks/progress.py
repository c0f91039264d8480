"""What a run prints while it trains: a progress bar that shows the loss and the DDI controllers'
state on a terminal, one plain line per epoch elsewhere, and a model summary without the metric
modules."""

from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import model_summary
from torchmetrics import Metric, MetricCollection

# Shown when logged, in this order: loss, validation score, SafeDrug's PID β and batch DDI rate,
# GAMENet's annealing temperature and share of DDI-loss steps, MiranDa's phase.
SHOWN = (
    ("train_loss", "loss"),
    ("val_jaccard", "val_jaccard"),
    ("pid_beta", "β"),
    ("pid_ddi_rate", "ddi"),
    ("ddi_temperature", "T"),
    ("ddi_loss_share", "ddi_steps"),
    ("train_therapeutic", "therapeutic"),
)


def shown_metrics(trainer, epoch_means: bool = False) -> dict[str, str]:
    """The SHOWN figures the run has logged so far (the latest step's, or the epoch means)."""
    logged = trainer.callback_metrics
    out = {}
    suffixes = ("_epoch", "_step") if epoch_means else ("_step", "_epoch")
    for key, label in SHOWN:
        for name in (key, *(key + suffix for suffix in suffixes)):
            if name in logged:
                value = float(logged[name])
                out[label] = f"{value:.4g}" if math.isfinite(value) else str(value)
                break
    return out


class MedRecProgressBar(TQDMProgressBar):
    """tqdm bar (terminals only) with the SHOWN figures instead of Lightning's ``v_num``."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.pop("val_jaccard", None)
        return {**items, **shown_metrics(trainer)}


class EpochLines(ProgressBar):
    """One line per training epoch, for logs and cluster jobs where a bar's carriage-return frames
    would pile up: ``epoch 3/40  2.1 s  loss 0.213  val_jaccard 0.4108 (best 0.4108)  β 0.93``."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._start = time.perf_counter()
        self._best: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        words = [f"epoch {trainer.current_epoch + 1}/{total}", f"{time.perf_counter() - self._start:.1f} s"]
        for label, value in shown_metrics(trainer, epoch_means=True).items():
            if label == "val_jaccard":
                current = float(trainer.callback_metrics["val_jaccard"])
                self._best = current if self._best is None else max(self._best, current)
                value = f"{value} (best {self._best:.4g})"
            words.append(f"{label} {value}")
        print("  ".join(words), flush=True)


def progress_bar(stream=None) -> ProgressBar:
    """The bar on a terminal, one line per epoch when output goes to a file or a pipe."""
    stream = sys.stdout if stream is None else stream
    return MedRecProgressBar() if stream.isatty() else EpochLines()


class _SummaryWithoutMetrics(model_summary.ModelSummary):
    def summarize(self):
        layers = super().summarize()
        metric = (Metric, MetricCollection)
        return type(layers)((name, layer) for name, layer in layers.items() if not isinstance(layer._module, metric))


class MedRecModelSummary(ModelSummary):
    """Lightning's model summary less the torchmetrics modules (they hold no parameters)."""

    def _summary(self, trainer, pl_module):
        return _SummaryWithoutMetrics(pl_module, max_depth=self._max_depth)

"""Wall-clock seconds of each training epoch, validation excluded."""

from __future__ import annotations

import time

import lightning as L


class EpochTimer(L.Callback):
    """Records ``epoch_seconds`` (training batches only) and logs each epoch's figure."""

    def __init__(self):
        self.epoch_seconds: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def _stop(self, pl_module) -> None:
        if self._start is not None:
            self.epoch_seconds.append(time.perf_counter() - self._start)
            self._start = None

    # Lightning runs the epoch-end validation before on_train_epoch_end; the sanity check
    # before the first epoch finds no running timer.
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._stop(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop(pl_module)
        if self.epoch_seconds:
            # every rank times its own epoch; the slowest one is the epoch's time
            pl_module.log("epoch_seconds", self.epoch_seconds[-1], sync_dist=True, reduce_fx="max")

    def state_dict(self) -> dict:
        return {"epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch_seconds = list(state_dict["epoch_seconds"])

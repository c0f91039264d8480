"""What the DDI controllers share: attaching to the module they steer, and the batch DDI rate
pooled over every DDP rank."""

from __future__ import annotations

import lightning as L
import torch


class AttachedDDIControl(L.Callback):
    """A callback the LightningModule calls during its training step.

    Subclasses name the module attribute they occupy (``attribute``, e.g. SafeDrug's
    ``ddi_controller``); for the fit the callback stores itself there, and removes itself at
    teardown. :meth:`pooled_ddi_rate` turns a batch's (interacting, all) predicted pair counts
    into one DDI rate, summing the counts over DDP ranks first, so every rank sees the same rate
    and takes the same decision.
    """

    attribute: str = ""

    def __init__(self):
        self._strategy = None

    def pooled_ddi_rate(self, ddi_pairs: torch.Tensor | float, all_pairs: torch.Tensor | float) -> float:
        counts = torch.stack([torch.as_tensor(ddi_pairs), torch.as_tensor(all_pairs)]).double()
        if self._strategy is not None:
            counts = self._strategy.reduce(counts, reduce_op="sum")
        ddi, total = counts.tolist()
        return ddi / total if total > 0 else 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, self.attribute):
            raise TypeError(
                f"{type(self).__name__} needs a module with a `{self.attribute}` attribute; "
                f"{type(pl_module).__name__} has none"
            )
        setattr(pl_module, self.attribute, self)
        self._strategy = trainer.strategy

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, self.attribute, None) is self:
            setattr(pl_module, self.attribute, None)
        self._strategy = None

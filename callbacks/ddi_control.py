"""What the DDI controllers share: their place on the command line, attaching to the module they
steer, and the batch DDI rate pooled over every DDP rank."""

from __future__ import annotations

import lightning as L
import torch

from datamodules.errors import OptionError

CLI_GROUP = "ddi_controller"
"""train.py's argument group of the run's one DDI controller (``--ddi_controller.init_args.target_ddi``)."""


class DDIController(L.Callback):
    """A callback that steers the DDI term of a model's loss; the LightningModule calls it during
    its training step.

    A run has at most one, given in train.py's ``ddi_controller`` group (config key
    ``ddi_controller:``, options ``--ddi_controller.init_args.<name>``), never in
    ``trainer.callbacks``: a list position is not a stable name for a sweep or a γ grid.

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
            raise OptionError(
                f"--{CLI_GROUP} {type(self).__name__} steers a module with a `{self.attribute}` attribute; "
                f"{type(pl_module).__name__} has none (choose another controller, or --{CLI_GROUP}=null)"
            )
        setattr(pl_module, self.attribute, self)
        self._strategy = trainer.strategy

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, self.attribute, None) is self:
            setattr(pl_module, self.attribute, None)
        self._strategy = None

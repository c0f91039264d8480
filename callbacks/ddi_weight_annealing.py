"""MoleRec's DDI-loss weight annealing: β = min(1, exp(k (1 − r / γ))) from the predicted DDI rate."""

from __future__ import annotations

from typing import Literal

import torch

from callbacks.ddi_control import DDIController
from lightning_modules.step_logging import log_step_and_epoch


class DDIWeightAnnealing(DDIController):
    """β of MoleRec's loss β·L_acc + (1 − β)·L_ddi (Yang et al., WWW 2023, "DDI loss weight annealing").

    With r the DDI rate of the thresholded prediction and γ the target rate,

        β = 1                          if r <= γ
        β = exp(k · (1 − r / γ))       otherwise,

    so β decays exponentially as r exceeds γ (k = ``coef``, paper 2.5) instead of linearly as in
    SafeDrug's controller (``callbacks.PIDDDIController``). The law has no memory: β depends on
    the current prediction only.

    ``granularity``: the authors take one optimiser step per visit, so r is the rate of one
    visit's predicted set. ``"visit"`` (default) keeps that: every visit of a batch gets its own β
    from its own rate and the loss is the mean over visits of the per-visit mix. ``"batch"``
    pools the interacting and all predicted pairs of the batch (summed over DDP ranks) into one
    rate and one β, as SafeDrug's controller does. Per-visit β needs no communication: each
    rank weighs its own visits.

    Given as the run's ``ddi_controller`` (``--ddi_controller.init_args.target_ddi=0.05``).
    Protocol: the LightningModule has a ``ddi_controller`` attribute; this callback occupies it
    for the fit and the module calls :meth:`weights` once per training step with the per-visit
    (interacting, all) predicted pair counts. The mean β and the pooled batch rate are logged
    (``ddi_beta``, ``ddi_rate``).

    Args:
        target_ddi: γ (paper 0.06).
        coef: k, the steepness of the decay (paper 2.5).
        granularity: ``visit`` or ``batch`` (see above).
    """

    attribute = "ddi_controller"

    def __init__(self, target_ddi: float = 0.06, coef: float = 2.5, granularity: Literal["visit", "batch"] = "visit"):
        super().__init__()
        if not 0.0 <= target_ddi <= 1.0:
            raise ValueError(f"target_ddi must lie in [0, 1], got {target_ddi}")
        if coef <= 0:
            raise ValueError(f"coef must be > 0, got {coef}")
        if granularity not in ("visit", "batch"):
            raise ValueError(f"granularity must be 'visit' or 'batch', got {granularity!r}")
        self.target_ddi, self.coef, self.granularity = float(target_ddi), float(coef), granularity
        self.beta = 1.0  # mean β of the last step
        self.ddi_rate = 0.0  # pooled DDI rate of the last step's batch (this rank's, for "visit")
        self.steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_ddi=self.target_ddi, coef=self.coef, granularity=self.granularity)

    def law(self, rate: torch.Tensor) -> torch.Tensor:
        """β for DDI rate(s) ``rate`` (elementwise)."""
        rate = torch.as_tensor(rate, dtype=torch.float64)
        if self.target_ddi == 0:  # any interacting pair is too many: the DDI loss only
            return torch.where(rate > 0, 0.0, 1.0).double()
        return torch.exp(self.coef * (1 - rate / self.target_ddi)).clamp(max=1.0)

    def weights(self, ddi_pairs: torch.Tensor, all_pairs: torch.Tensor) -> torch.Tensor:
        """β per visit, shape of ``ddi_pairs`` (one value repeated when ``granularity="batch"``)."""
        ddi_pairs, all_pairs = torch.as_tensor(ddi_pairs), torch.as_tensor(all_pairs)
        if self.granularity == "batch":
            rate = torch.tensor(self.pooled_ddi_rate(ddi_pairs.sum(), all_pairs.sum()))
            beta = self.law(rate).expand(ddi_pairs.shape)
            self.ddi_rate = float(rate)
        else:
            rate = torch.where(all_pairs > 0, ddi_pairs.double() / all_pairs.double().clamp(min=1), 0.0)
            beta = self.law(rate)
            total = float(all_pairs.sum())
            self.ddi_rate = float(ddi_pairs.sum()) / total if total > 0 else 0.0
        self.beta = float(beta.mean()) if beta.numel() else 1.0
        self.steps += 1
        return beta.to(device=ddi_pairs.device, dtype=torch.float32)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        log_step_and_epoch(pl_module, {"ddi_beta": self.beta, "ddi_rate": self.ddi_rate}, batch_size=1)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "ddi_rate": self.ddi_rate, "steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.beta = float(state_dict["beta"])
        self.ddi_rate = float(state_dict["ddi_rate"])
        self.steps = int(state_dict["steps"])

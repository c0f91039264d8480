"""GAMENet's annealed switch between the prediction loss and the DDI loss."""

from __future__ import annotations

import math

import lightning as L
import torch

from callbacks.ddi_control import DDIController


class DDIAnnealing(DDIController):
    """Simulated-annealing choice of the training loss (GAMENet, Shang et al. 2019, "Training").

    At every training step the module reports the DDI rate s' of its thresholded predictions for
    the batch. If s' <= ``target_ddi`` (the expected rate s) the prediction loss is used;
    otherwise the DDI loss is used with probability exp(-(s' - s) / T), else the prediction loss.
    T starts at ``temperature`` and is multiplied by ``decay`` once per finished training epoch
    (applied when the next epoch starts), so the DDI loss is chosen less and less often as
    training settles. The authors' code steps, and decides, once per visit; here one decision
    covers a batch, whose rate pools the interacting and all predicted pairs of all its visits.

    Given as the run's ``ddi_controller`` (``--ddi_controller.init_args.temperature=0.5``).
    Protocol: the LightningModule has an attribute ``ddi_switch`` (None by default); this
    callback puts itself there for the fit and the module calls :meth:`choose` once per training
    step with its batch's interacting-pair and all-pair counts.

    Distributed training: the counts are summed over ranks before the rate is formed, and the
    random draw comes from a generator seeded with ``seed`` that advances by exactly one draw
    per step on every rank, so all ranks take the same decision. T, the number of decays
    applied and the generator state are part of the checkpoint (``state_dict``), so a resumed
    fit continues the same schedule.

    Args:
        target_ddi: expected DDI rate s (paper 0.05).
        temperature: initial temperature T0 (paper 0.5).
        decay: per-epoch multiplier of T (paper 0.85).
        seed: seed of the generator that draws the switch.
    """

    attribute = "ddi_switch"

    def __init__(self, target_ddi: float = 0.05, temperature: float = 0.5, decay: float = 0.85, seed: int = 0):
        super().__init__()
        if not 0.0 <= target_ddi <= 1.0:
            raise ValueError(f"target_ddi must lie in [0, 1], got {target_ddi}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.target_ddi = float(target_ddi)
        self.temperature = float(temperature)
        self.decay = float(decay)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epochs_annealed = 0  # decays applied so far = index of the epoch T belongs to
        self.steps = 0  # this epoch
        self.ddi_steps = 0

    # --- the decision ------------------------------------------------------------------
    def probability(self, ddi_rate: float) -> float:
        """Chance of taking the DDI loss at batch DDI rate ``ddi_rate`` and the current T."""
        if ddi_rate <= self.target_ddi:
            return 0.0
        return math.exp(-(ddi_rate - self.target_ddi) / self.temperature)

    def choose(self, ddi_pairs: torch.Tensor, all_pairs: torch.Tensor) -> bool:
        """True when this step should optimise the DDI loss instead of the prediction loss."""
        rate = self.pooled_ddi_rate(ddi_pairs, all_pairs)
        draw = torch.rand((), generator=self.generator).item()  # drawn every step: ranks stay in step
        use_ddi = draw < self.probability(rate)
        self.steps += 1
        self.ddi_steps += int(use_ddi)
        return use_ddi

    # --- Lightning hooks ---------------------------------------------------------------
    # Decaying at the start of the next epoch (not at the end of this one) keeps a checkpoint
    # written by the end-of-epoch validation, before on_train_epoch_end, consistent on resume.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        while self.epochs_annealed < trainer.current_epoch:
            self.temperature *= self.decay
            self.epochs_annealed += 1
        self.steps = self.ddi_steps = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        share = self.ddi_steps / self.steps if self.steps else 0.0
        # equal on every rank (the decision is taken on pooled counts); syncing only says so to Lightning
        pl_module.log("ddi_temperature", self.temperature, sync_dist=True)
        pl_module.log("ddi_loss_share", share, sync_dist=True)

    # --- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "epochs_annealed": self.epochs_annealed,
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "ddi_steps": self.ddi_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.temperature = float(state_dict["temperature"])
        self.epochs_annealed = int(state_dict["epochs_annealed"])
        self.generator.set_state(state_dict["generator"])
        self.steps = int(state_dict["steps"])
        self.ddi_steps = int(state_dict["ddi_steps"])

"""SafeDrug's controllable loss: a PID controller that turns the batch DDI rate into the weight β."""

from __future__ import annotations

import torch

from callbacks.ddi_control import DDIController
from lightning_modules.step_logging import log_step_and_epoch


class PIDDDIController(DDIController):
    """β of SafeDrug's loss β·L_acc + (1 − β)·L_ddi from the DDI rate of each training batch.

    Paper Eq. 19 (proportional control): with the batch DDI rate r of the thresholded
    predictions and the target γ,

        β = 1                              if r <= γ
        β = max(0, 1 − (r − γ) / Kp)       otherwise.

    (The reference code writes ``min(0, …)`` here, which makes β <= 0 above the target: a known
    typo; this is the paper's form.) Optional integral and derivative terms generalise it to
    u = (e + Ki·I + Kd·D) / Kp with error e = r − γ, I the running sum of errors clipped to
    [0, ``integral_limit``] (only excess accumulates, so it cannot wind up below target) and
    D = e − e_previous; β = 1 when u <= 0, else max(0, 1 − u). With Ki = Kd = 0 (default) this
    is exactly Eq. 19.

    Given as the run's ``ddi_controller`` (``--ddi_controller.init_args.target_ddi=0.06``).
    Protocol: the LightningModule has a ``ddi_controller`` attribute (e.g. SafeDrug); this
    callback puts itself there for the fit, and the module calls :meth:`update` once per
    training step with its batch's interacting-pair and all-pair counts and uses the β it
    returns. Under DDP the counts are summed over ranks before the rate is formed, so every rank
    computes the same β and controller state. β, the rate, the error and the integral are
    logged every step (``pid_*``) and the state is part of checkpoints (``state_dict``).

    Args:
        target_ddi: γ, the DDI rate to stay under (paper 0.06).
        kp: Kp, the excess DDI rate at which β reaches 0 (paper 0.05).
        ki, kd: integral and derivative gains (0 = off).
        integral_limit: upper clip of the integral term I.
    """

    attribute = "ddi_controller"

    def __init__(
        self,
        target_ddi: float = 0.06,
        kp: float = 0.05,
        ki: float = 0.0,
        kd: float = 0.0,
        integral_limit: float = 1.0,
    ):
        super().__init__()
        if not 0.0 <= target_ddi <= 1.0:
            raise ValueError(f"target_ddi must lie in [0, 1], got {target_ddi}")
        if kp <= 0:
            raise ValueError(f"kp must be > 0, got {kp}")
        if ki < 0 or kd < 0 or integral_limit < 0:
            raise ValueError(f"ki, kd and integral_limit must be >= 0, got {ki}, {kd}, {integral_limit}")
        self.target_ddi, self.kp, self.ki, self.kd = float(target_ddi), float(kp), float(ki), float(kd)
        self.integral_limit = float(integral_limit)
        self.beta = 1.0
        self.ddi_rate = 0.0
        self.error = 0.0
        self.integral = 0.0
        self.steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_ddi=self.target_ddi, kp=self.kp, ki=self.ki, kd=self.kd)

    # --- the control law -----------------------------------------------------------------
    def step(self, ddi_rate: float) -> float:
        """Advance the controller by one observation of the DDI rate; returns the new β."""
        error = float(ddi_rate) - self.target_ddi
        derivative = error - self.error if self.steps > 0 else 0.0
        self.integral = min(max(self.integral + error, 0.0), self.integral_limit)
        control = (error + self.ki * self.integral + self.kd * derivative) / self.kp
        self.beta = 1.0 if control <= 0 else max(0.0, 1.0 - control)
        self.ddi_rate, self.error = float(ddi_rate), error
        self.steps += 1
        return self.beta

    def update(self, ddi_pairs: torch.Tensor | float, all_pairs: torch.Tensor | float) -> float:
        """β for this training step from the batch's (interacting, all) predicted pair counts."""
        return self.step(self.pooled_ddi_rate(ddi_pairs, all_pairs))

    # --- Lightning hooks -----------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = {"pid_beta": self.beta, "pid_ddi_rate": self.ddi_rate, "pid_error": self.error}
        if self.ki > 0:
            state["pid_integral"] = self.integral
        log_step_and_epoch(pl_module, state, batch_size=1)

    # --- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "ddi_rate": self.ddi_rate,
            "error": self.error,
            "integral": self.integral,
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.beta = float(state_dict["beta"])
        self.ddi_rate = float(state_dict["ddi_rate"])
        self.error = float(state_dict["error"])
        self.integral = float(state_dict["integral"])
        self.steps = int(state_dict["steps"])

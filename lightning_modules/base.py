"""Shared LightningModule for multi-label medication recommendation.

Subclasses implement ``forward(batch) -> logits (B, T, M)`` for every visit of every patient of a
``VisitBatch`` (respecting causality: visit t may use diagnoses/procedures up to t and drugs before t)
and may override ``compute_loss``. This base owns the rest of the protocol so every method is
evaluated the same way: thresholding, the SafeDrug-reference metrics, the bootstrap test
protocol, prediction records and the cohort-knowledge check on checkpoints. Its evaluation steps
read only the ``PatientBatch`` keys (targets, visit mask, ids; ``datamodules/batches.py``), so they
serve every layout that extends it.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import CatMetric

from datamodules.batches import PatientBatch, VisitBatch
from datamodules.cohort import CohortError
from datamodules.errors import CheckpointError, MedRecError
from datamodules.knowledge import CohortKnowledge
from datamodules.options import NonNegativeFloat, PositiveFloat, PositiveInt, Probability, check_range, plain
from datamodules.safe_pickle import load_checkpoint
from datamodules.visit_sequence import VisitCollator
from lightning_modules.metrics import PatientMetricTable, bootstrap, recommendation_metrics, summarize
from lightning_modules.precision import float32
from lightning_modules.process_group import destroy_process_group_at_exit
from lightning_modules.recommend import MODEL_CLASS_KEY, check_threshold, visit_record
from lightning_modules.step_logging import log_epoch_means, log_step_and_epoch
from lightning_modules.visit_ops import margin_targets

KNOWLEDGE_KEY = "cohort_knowledge"
NONFINITE_CHECK_EVERY = 50  # training steps between two host reads of the non-finite loss flag


class NonFiniteLossError(MedRecError):
    """The training loss became NaN or infinite (the fit stops before NaN weights are saved)."""


RNG_KEY = "medrec_rng_states"


def rng_states() -> dict:
    """torch/numpy/python RNG states in plain types, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def visit_ids(batch: PatientBatch, b: int, t: int) -> dict:
    """``patient_id`` and ``visit_id`` of visit ``t`` of batch row ``b``: the ids the collator put in
    the batch (``patient_ids``, ``visit_ids``), else the patient's index and the visit's position."""
    if "patient_ids" in batch and "visit_ids" in batch:
        return {"patient_id": batch["patient_ids"][b], "visit_id": batch["visit_ids"][b][t]}
    return {"patient_id": int(batch["patient_index"][b]), "visit_id": t}


class MedRecModule(L.LightningModule):
    """Base for every recommender: loss hooks, metrics, bootstrap test, predict output.

    Args:
        knowledge: vocabularies and knowledge matrices; linked from the DataModule by train.py.
        lr, weight_decay: Adam settings.
        threshold: a drug is recommended when its probability >= threshold (reference: 0.5).
        margin_weight: loss = (1 - w) * BCE + w * multilabel margin (SafeDrug 0.05, GAMENet 0.1).
        bootstrap_rounds, bootstrap_fraction, bootstrap_seed: test protocol of the SafeDrug code
            (10 rounds of 80 % of test patients drawn with replacement); 0 rounds = full test set.
    """

    KNOWLEDGE_CLASS = CohortKnowledge  # what from_checkpoint rebuilds from the checkpoint
    # Settings that only change how a trained model is evaluated or asked: given on the command
    # line with --ckpt_path they apply; every other setting comes from the checkpoint (train.py).
    EVALUATION_SETTINGS: tuple[str, ...] = ("threshold", "bootstrap_rounds", "bootstrap_fraction", "bootstrap_seed")
    # Base arguments a subclass fixes and does not take: left out of the saved hyperparameters,
    # so its checkpoints load (from_checkpoint) into a model built in Python.
    FIXED_SETTINGS: tuple[str, ...] = ()

    def __init__(
        self,
        knowledge: CohortKnowledge | None = None,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        threshold: Probability = 0.5,
        margin_weight: float = 0.0,
        bootstrap_rounds: PositiveInt = 10,
        bootstrap_fraction: Probability = 0.8,
        bootstrap_seed: int = 0,
    ):
        super().__init__()
        if knowledge is None:
            raise CohortError(
                f"{type(self).__name__} needs the data's CohortKnowledge: run it through train.py, "
                "or pass knowledge=datamodule.knowledge"
            )
        if not 0.0 <= margin_weight <= 1.0:
            raise ValueError(f"margin_weight must lie in [0, 1], got {margin_weight}")
        check_range("lr", lr, 0, open_low=True)  # the CLI refuses these at parse time; Python callers here
        check_threshold(threshold)
        self.save_hyperparameters(ignore=["knowledge", *self.FIXED_SETTINGS])
        self.hparams.update(plain(dict(self.hparams)))  # parsed option types -> builtins (weights_only)
        # not via hparams: those hold the outermost __init__'s arguments, and subclasses that fix
        # the threshold (the package recommenders) do not take one
        self.threshold = threshold
        self._first_nonfinite: torch.Tensor | None = None
        self.knowledge = knowledge
        self.register_buffer("ddi_adj", knowledge.ddi_tensor(), persistent=False)
        self.val_metrics = recommendation_metrics(self.ddi_adj, threshold, prefix="val_")
        self.test_table = PatientMetricTable(self.ddi_adj, threshold)
        # Patient order of the gathered table depends on how ranks split the data; the bootstrap
        # draws by position, so rows are put back in dataset order before it.
        self.test_order = CatMetric()

    @property
    def num_medications(self) -> int:
        return self.knowledge.num_medications

    # Subclasses that override setup call super().setup(stage).
    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit(self.trainer)

    # --- hooks for subclasses ------------------------------------------------------------
    def forward(self, batch: VisitBatch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def predict_probabilities(self, batch: VisitBatch) -> torch.Tensor:
        logits = self(batch)
        with float32(logits):
            return torch.sigmoid(logits.float())

    def compute_loss(self, logits: torch.Tensor, batch: VisitBatch) -> dict[str, torch.Tensor]:
        """Returns a dict with the total under ``loss``; the other entries are logged."""
        with float32(logits):
            mask = batch["visit_mask"]
            logits, target = logits[mask].float(), batch["medications"][mask]
            bce = F.binary_cross_entropy_with_logits(logits, target)
            out = {"bce": bce}
            weight = self.hparams.margin_weight
            if weight > 0:
                out["margin"] = F.multilabel_margin_loss(torch.sigmoid(logits), margin_targets(target))
                out["loss"] = (1 - weight) * bce + weight * out["margin"]
            else:
                out["loss"] = bce
            return out

    # --- loops ---------------------------------------------------------------------------
    def training_step(self, batch: VisitBatch, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(self(batch), batch)
        self.log_train_losses(losses, batch_size=len(batch["lengths"]))
        return losses["loss"]

    def log_train_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """``train_<k>_step`` and ``train_<k>_epoch`` for each loss term (see log_step_and_epoch)."""
        log_step_and_epoch(self, {f"train_{k}": v for k, v in losses.items()}, batch_size)

    def on_train_epoch_end(self) -> None:
        log_epoch_means(self)  # what an epoch cut short before its last batch summed (see step_logging)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Stop a fit whose loss stopped being finite, before NaN weights are checkpointed. The
        first bad batch is kept on the device; the host reads it every NONFINITE_CHECK_EVERY
        steps and at the epoch's end (no sync per step)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        first = self._first_nonfinite
        if first is None or first.device != loss.device:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all()
        self._first_nonfinite = torch.where(bad & (first < 0), batch_idx, first)
        if (batch_idx + 1) % NONFINITE_CHECK_EVERY == 0 or self.trainer.is_last_batch:
            at = int(self._first_nonfinite)
            self._first_nonfinite = None
            if at >= 0:
                raise NonFiniteLossError(
                    f"{type(self).__name__}: the training loss of epoch {self.current_epoch}, batch {at} is not "
                    "finite (NaN or inf); the weights are no longer usable. Lower --model.init_args.lr, or check "
                    "the cohort's numeric fields"
                )

    def validation_step(self, batch: PatientBatch, batch_idx: int) -> None:
        probs = self.predict_probabilities(batch)
        with float32(probs):
            self.val_metrics.update(probs=probs.float(), target=batch["medications"], visit_mask=batch["visit_mask"])
        if batch_idx == 0:
            # A logged Metric is computed (over every update of the epoch) and reset by Lightning at
            # the epoch's end, so handing it over once is enough; self.log costs ~0.5 ms a call.
            for name, metric in self.val_metrics.items():
                self.log(name, metric, prog_bar=name == "val_jaccard")

    def test_step(self, batch: PatientBatch, batch_idx: int) -> None:
        probs = self.predict_probabilities(batch)
        with float32(probs):
            self.test_table.update(probs.float(), batch["medications"], batch["visit_mask"])
        self.test_order.update(batch["patient_index"][batch["visit_mask"].any(1)])

    def on_test_epoch_end(self) -> None:
        order = torch.argsort(self.test_order.compute().reshape(-1))
        table = {k: v.reshape(-1)[order] for k, v in self.test_table.compute().items()}
        full = summarize(table)
        hp = self.hparams
        results = {f"test_all_{k}": v for k, v in full.items()}
        if hp.bootstrap_rounds > 0:
            boot = bootstrap(table, hp.bootstrap_rounds, hp.bootstrap_fraction, hp.bootstrap_seed)
            results.update({f"test_{k}": v for k, v in boot.items()})
        else:
            results.update({f"test_{k}": v for k, v in full.items()})
        results["test_patients"] = float(len(table["jaccard"]))
        # Values are already reduced across ranks by the metric; logging must not average again.
        for key, value in results.items():
            self.log(key, float(value), sync_dist=False, rank_zero_only=False)
        self.test_table.reset()
        self.test_order.reset()

    def predict_step(self, batch: PatientBatch, batch_idx: int) -> list[dict]:
        """One record per visit: ids, recommended drugs (codes, names, probabilities), DDI pairs,
        and the drugs the visit recorded (the batch's target) with the Jaccard against them."""
        threshold = check_threshold(self.threshold, "threshold (--model.init_args.threshold)")
        probs = self.predict_probabilities(batch).float().cpu()
        recorded = batch["medications"].cpu()
        records = []
        for b, t in batch["visit_mask"].nonzero().tolist():
            drugs = recorded[b, t].nonzero().flatten().tolist()
            record = visit_record(probs[b, t], threshold, self.knowledge, recorded=drugs)
            records.append({**visit_ids(batch, b, t), **record})
        return records

    def collate_histories(self, samples: list[dict]) -> VisitBatch:
        """The batch of patients given as ``PatientSequences`` samples (``Recommender`` builds them
        from codes): the visit-sequence layout; models that read another layout override it."""
        return VisitCollator(self.num_medications)(samples)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KNOWLEDGE_KEY] = self.knowledge.to_state()
        checkpoint[MODEL_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        # Dropout and other random draws continue exactly where they were after --ckpt_path last.
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for key in (KNOWLEDGE_KEY, RNG_KEY):  # both written by every save (on_save_checkpoint)
            if key not in checkpoint:
                raise CheckpointError(f"the checkpoint has no {key}: not written by this version of medrec")
        # the knowledge's own class: what it adds (DPR's disease-document vocabulary) is compared too
        self.knowledge.check_compatible(type(self.knowledge).from_state(checkpoint[KNOWLEDGE_KEY]))
        if self._trainer is not None and self.trainer.state.fn == "fit":
            restore_rng_states(checkpoint[RNG_KEY])

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu", **hparams) -> MedRecModule:
        """Load a trained model without its DataModule (the knowledge travels in the checkpoint);
        ``hparams`` override the saved hyperparameters."""
        checkpoint = load_checkpoint(path, map_location=map_location)  # weights_only: no code runs
        if KNOWLEDGE_KEY not in checkpoint:
            raise CohortError(f"{path}: not a medrec checkpoint (no {KNOWLEDGE_KEY})")
        knowledge = cls.KNOWLEDGE_CLASS.from_state(checkpoint[KNOWLEDGE_KEY])
        return cls.load_from_checkpoint(
            path, map_location=map_location, weights_only=True, knowledge=knowledge, **hparams
        )

"""MiranDa (Wang et al., 2024): a Transformer recommender trained in two phases shifted by ELOS.

* :class:`MiranDaPredictor` — the predictor of paper §2.3 and the baseline: per feature type
  (diagnoses, procedures, abnormal labs, demographics; optionally the previous visit's drugs)
  one token per visit, a causal Transformer encoder over the visit sequence (visit t attends
  to visits <= t, so its output pools the history of that type), the pooled vectors of all
  types concatenated, a linear layer to drug logits. Trained with BCE only. When the data
  have length of stay and age it also reports ELOS (:mod:`lightning_modules.elos`).
* :class:`MiranDa` — the same predictor with the two-phase optimisation of §2.3
  (see :meth:`MiranDa.training_step`, the one place it lives).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor, nn

from datamodules.batches import VisitBatch
from datamodules.cohort import CohortError
from datamodules.knowledge import TrainingStays
from datamodules.options import DropoutRate, PositiveInt
from lightning_modules.base import MedRecModule
from lightning_modules.elos import ELOSMetric, Retrieval, StayIndex
from lightning_modules.precision import float32
from lightning_modules.visit_ops import embed_codes, previous_visit

log = logging.getLogger(__name__)

Feature = Literal["diagnoses", "procedures", "labs", "demographics", "medications"]
CODE_FEATURES = {"diagnoses": "num_diagnoses", "procedures": "num_procedures", "labs": "num_labs"}
ELOS_FIELDS = ("los", "age", "procedures")


class MiranDaPredictor(MedRecModule):
    """MiranDa's Transformer predictor (paper §2.3), trained with BCE: the baseline.

    Args:
        features: token types; ``demographics`` = age, gender and admission number;
            ``medications`` = the previous visit's drugs (not in the paper, off by default).
        embedding_dim, heads, layers, dropout: the per-type Transformer encoders.
        max_admissions: admission numbers beyond this share the last embedding.
        age_window, top_k, min_similarity: ELOS retrieval (n = 5 years, K = 50, φ).
    """

    def __init__(
        self,
        *args,
        features: tuple[Feature, ...] = ("diagnoses", "procedures", "labs", "demographics"),
        embedding_dim: PositiveInt = 64,
        heads: PositiveInt = 4,
        layers: int = 1,
        dropout: DropoutRate = 0.2,
        max_admissions: int = 32,
        age_window: float = 5.0,
        top_k: PositiveInt = 50,
        min_similarity: float = 0.35,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not features or len(set(features)) != len(features):
            raise ValueError(f"features must be a non-empty list without repeats, got {list(features)}")
        if embedding_dim % heads:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be divisible by heads ({heads})")
        k = self.knowledge
        self.features = tuple(features)
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(max(getattr(k, size), 1), embedding_dim) for name, size in CODE_FEATURES.items()}
        )
        self.previous_drugs = nn.Linear(k.num_medications, embedding_dim, bias=False)
        self.age = nn.Linear(2, embedding_dim)  # scaled age, missing flag
        self.gender = nn.Embedding(3, embedding_dim)
        self.admission = nn.Embedding(max_admissions, embedding_dim)
        self.position = nn.Embedding(max_admissions, embedding_dim)
        self.encoders = nn.ModuleDict({name: self._encoder(embedding_dim, heads, layers, dropout) for name in features})
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(len(features) * embedding_dim, k.num_medications)
        # Every module exists whatever `features` says (one checkpoint layout), but those of
        # feature types left out take no gradient: DDP (find_unused_parameters off) stops at
        # trainable parameters that never receive one.
        unused = [self.embeddings[name] for name in CODE_FEATURES if name not in features]
        if "medications" not in features:
            unused.append(self.previous_drugs)
        if "demographics" not in features:
            unused += [self.age, self.gender, self.admission]
        for module in unused:
            module.requires_grad_(False)
        self.stay_index: StayIndex | None = None
        self.val_elos = ELOSMetric()
        self.test_elos = ELOSMetric()

    @staticmethod
    def _encoder(dim: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    # --- predictor -----------------------------------------------------------------------
    def _tokens(self, name: str, batch: VisitBatch, visits: Tensor) -> Tensor:
        if name in CODE_FEATURES:
            return embed_codes(self.embeddings[name], batch[name], batch[f"{name}_mask"])
        if name == "medications":
            return self.previous_drugs(previous_visit(batch["medications"]))
        age = batch["age"]
        missing = torch.isnan(age)
        scaled = torch.where(missing, torch.zeros_like(age), (age - 60.0) / 20.0)
        return (
            self.age(torch.stack([scaled, missing.to(age.dtype)], -1))
            + self.gender(batch["gender"].clamp(0, 2))[:, None, :]
            + self.admission(visits)[None]
        )

    def forward(self, batch: VisitBatch) -> Tensor:
        steps = batch["visit_mask"].shape[1]
        visits = torch.arange(steps, device=batch["visit_mask"].device).clamp(max=self.position.num_embeddings - 1)
        causal = nn.Transformer.generate_square_subsequent_mask(steps, device=visits.device)
        pooled = []
        for name in self.features:
            tokens = self._tokens(name, batch, visits) + self.position(visits)[None]
            pooled.append(self.encoders[name](self.dropout(tokens), mask=causal, is_causal=True))
        return self.output(self.dropout(torch.cat(pooled, -1)))

    # --- ELOS ----------------------------------------------------------------------------
    @property
    def has_stay_data(self) -> bool:
        return all(self.knowledge.has_field(name) for name in ELOS_FIELDS)

    def build_stay_index(self, train_dataset=None) -> StayIndex:
        """Index the training stays for ELOS (:class:`StayIndex`): the knowledge's
        ``training_stays`` (set by the DataModule, stored in checkpoints), or ``train_dataset``
        (a ``PatientSequences`` of the training split) when given. Called from ``setup``."""
        hp = self.hparams
        stays = self.knowledge.training_stays if train_dataset is None else TrainingStays.from_sequences(train_dataset)
        if stays is None:
            raise CohortError(f"{type(self).__name__}: the knowledge holds no training stays to index for ELOS")
        self.stay_index = StayIndex.from_stays(
            stays,
            num_procedures=self.knowledge.num_procedures,
            num_medications=self.num_medications,
            age_window=hp.age_window,
            top_k=hp.top_k,
            min_similarity=hp.min_similarity,
        )
        return self.stay_index

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.stay_index is not None or not self.has_stay_data:
            return
        if self.knowledge.training_stays is None:
            log.warning("%s: the knowledge holds no training stays; ELOS is not computed", type(self).__name__)
            return
        self.build_stay_index()

    def visit_stays(self, probs: Tensor, batch: VisitBatch, exclude_self: bool = False) -> tuple[Retrieval, Tensor]:
        """Hard-prediction ELOS of every real visit (row-major order) and the visits' real LOS."""
        index = self.stay_index
        if index.device != probs.device:
            index.to(probs.device)
        patient, visit = batch["visit_mask"].nonzero(as_tuple=True)
        exclude = None
        if exclude_self:
            exclude = index.rows_of(torch.stack([batch["patient_index"][patient], visit], -1))
        retrieval = index.retrieve(
            (probs[patient, visit] >= self.hparams.threshold).float(),
            batch["procedures"][patient, visit],
            batch["procedures_mask"][patient, visit],
            batch["age"][patient, visit],
            exclude=exclude,
        )
        return retrieval, batch["los"][patient, visit]

    # --- evaluation with ELOS ------------------------------------------------------------
    def predict_probabilities(self, batch: VisitBatch) -> Tensor:
        probs = super().predict_probabilities(batch)
        if not self.training:  # the base's evaluation steps call this; the ELOS update reuses it
            self._evaluated = (batch, probs)
        return probs

    def _probabilities_of(self, batch: VisitBatch) -> Tensor:
        cached = getattr(self, "_evaluated", None)
        self._evaluated = None
        return cached[1] if cached is not None and cached[0] is batch else self.predict_probabilities(batch)

    def validation_step(self, batch: VisitBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.stay_index is not None:
            probs = self._probabilities_of(batch)
            with float32(probs):
                retrieval, los = self.visit_stays(probs.float(), batch)
                self.val_elos.update(retrieval.elos, los)

    def on_validation_epoch_end(self) -> None:
        if self.stay_index is not None:
            figures = self.val_elos.compute()
            self.log_dict({f"val_{k}": v.float() for k, v in _rename(figures).items()})
            self.val_elos.reset()

    def test_step(self, batch: VisitBatch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if self.stay_index is not None:
            probs = self._probabilities_of(batch)
            with float32(probs):
                retrieval, los = self.visit_stays(probs.float(), batch)
                self.test_elos.update(retrieval.elos, los)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.stay_index is not None:
            for key, value in _rename(self.test_elos.compute()).items():
                self.log(f"test_{key}", float(value), sync_dist=False, rank_zero_only=False)
            self.test_elos.reset()

    def predict_step(self, batch: VisitBatch, batch_idx: int) -> list[dict]:
        """Base records plus ``elos``: the counterfactual length of stay of the recommendation (None if unknown)."""
        records = super().predict_step(batch, batch_idx)
        if self.stay_index is not None:
            retrieval, _ = self.visit_stays(self._probabilities_of(batch), batch)
            for record, value in zip(records, retrieval.elos.tolist()):
                record["elos"] = None if math.isnan(value) else round(value, 2)
        return records


def _rename(figures: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"elos": figures["elos"], "los": figures["los"], "elos_coverage": figures["coverage"]}


class MiranDa(MiranDaPredictor):
    """MiranDa: evidence-based training and therapeutic optimisation (paper §2.3).

    Per training batch, with the hard-prediction ELOS of every visit and its real LOS:

    * the *excess stay* H_B = mean(ELOS − LOS) over the visits that have an ELOS, summed
      across DDP ranks first so every rank takes the same branch;
    * evidence-based phase (H_B < δ, or during ``warmup_epochs``): one BCE step;
    * therapeutic-optimisation phase (H_B ≥ δ): one step on λ·BCE, then repeated steps on
      L' = ε(1−λ)·BCE + (1−ε)·P, P = log(1 + γ·H_B / ΣELOS), each on a fresh forward pass,
      until H_B < 0 or ``max_inner_steps``; after each inner step the perturbation's share
      decays, ε ← 1 − λ(1−ε).

    ELOS of a hard prediction has no gradient, so P uses a straight-through estimate: its
    value is the hard ELOS, its gradient that of :meth:`StayIndex.soft_elos`. P's sign is
    chosen so that minimising it lowers ELOS (the reward LOS − ELOS rises).

    The phase state (phase of the last batch, its H_B and final ε, counts of therapeutic
    batches and inner steps) is kept in buffers: it is checkpointed and, being computed
    from rank-reduced figures, the same on every rank.

    Args:
        decay: λ (paper 0.9). switch_threshold: δ in days (paper 0.2).
        confidence: γ (paper 0.5). blend: ε (paper 0.2).
        max_inner_steps: cap on the therapeutic inner loop.
        soft_temperature: temperature of the soft ELOS similarity weights.
        warmup_epochs: epochs of evidence-based training before the switch may trigger.
    """

    def __init__(
        self,
        *args,
        decay: float = 0.9,
        switch_threshold: float = 0.2,
        confidence: float = 0.5,
        blend: float = 0.2,
        max_inner_steps: int = 5,
        soft_temperature: float = 0.1,
        warmup_epochs: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        for name, value in (("decay", decay), ("blend", blend)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if max_inner_steps < 0 or soft_temperature <= 0:
            raise ValueError("max_inner_steps must be >= 0 and soft_temperature > 0")
        self.automatic_optimization = False
        self.register_buffer("phase", torch.tensor(0))  # 1 = therapeutic optimisation
        self.register_buffer("phase_excess", torch.tensor(float("nan")))
        self.register_buffer("phase_blend", torch.tensor(float(blend)))
        self.register_buffer("therapeutic_batches", torch.tensor(0))
        self.register_buffer("therapeutic_steps", torch.tensor(0))

    def setup(self, stage: str) -> None:
        # Checked here rather than in __init__, where LightningCLI would bury the message.
        self.knowledge.require(*ELOS_FIELDS, by="MiranDa")
        super().setup(stage)

    def on_fit_start(self) -> None:
        if self.stay_index is None:
            raise CohortError(
                "MiranDa needs the training stays (ages, lengths of stay) in its knowledge to build its ELOS index; "
                "train it on a VisitSequenceDataModule of a cohort with both"
            )

    # --- pieces of the objective ---------------------------------------------------------
    def _forward(self, batch: VisitBatch) -> dict:
        logits = self(batch)
        probs = torch.sigmoid(logits)
        retrieval, los = self.visit_stays(probs.detach(), batch, exclude_self=True)
        defined = retrieval.defined & ~torch.isnan(los)
        return {
            "supervised": self.compute_loss(logits, batch)["loss"],  # BCE (+ margin if set)
            "visit_probs": probs[batch["visit_mask"]],  # row-major, like the retrieval
            "retrieval": retrieval,
            "los": los,
            "defined": defined,
            "excess": self.excess_stay(retrieval.elos, los, defined),
        }

    def excess_stay(self, elos: Tensor, los: Tensor, defined: Tensor) -> Tensor:
        """H_B = mean(ELOS − LOS) over the visits with an ELOS on all ranks (NaN if none)."""
        totals = torch.stack([(elos - los)[defined].sum(), defined.sum().to(elos.dtype)]).double()
        if self._trainer is not None:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return totals[0] / totals[1] if totals[1] > 0 else totals.new_tensor(float("nan"))

    def perturbation(self, state: dict) -> Tensor:
        """P = log(1 + γ·H_B / ΣELOS) with straight-through ELOS (hard value, soft gradient).

        H_B and ΣELOS are over this batch's visits that have an ELOS. Dividing by the sum, not
        the mean, keeps P's gradient about as large as the BCE's for batches of some tens of
        visits (with the mean it is two orders larger and the inner loop forgets the labels).
        """
        defined = state["defined"]
        if not defined.any():
            return state["visit_probs"].sum() * 0.0
        soft = self.stay_index.soft_elos(state["visit_probs"], state["retrieval"], self.hparams.soft_temperature)
        hard = state["retrieval"].elos
        elos = (hard + soft - soft.detach())[defined]
        excess = elos.mean() - state["los"][defined].to(elos.dtype).mean()
        return torch.log((1 + self.hparams.confidence * excess / elos.sum()).clamp(min=1e-6))

    def _step(self, loss: Tensor) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    # --- the two-phase optimiser hook ----------------------------------------------------
    def training_step(self, batch: VisitBatch, batch_idx: int) -> Tensor:
        hp = self.hparams
        state = self._forward(batch)
        excess = state["excess"]
        therapeutic = bool(self.current_epoch >= hp.warmup_epochs and excess >= hp.switch_threshold)
        inner, blend = 0, hp.blend
        if not therapeutic:
            self._step(state["supervised"])
        else:
            self._step(hp.decay * state["supervised"])
            while inner < hp.max_inner_steps:
                inner_state = self._forward(batch)
                if not inner_state["excess"] >= 0:
                    break
                loss = blend * (1 - hp.decay) * inner_state["supervised"] + (1 - blend) * self.perturbation(inner_state)
                self._step(loss)
                blend = 1 - hp.decay * (1 - blend)
                inner += 1
        self.phase.fill_(int(therapeutic))
        self.phase_excess.fill_(float(excess))
        self.phase_blend.fill_(blend)
        self.therapeutic_batches += int(therapeutic)
        self.therapeutic_steps += inner
        size = len(batch["lengths"])
        figures = {
            "train_loss": state["supervised"].detach(),
            "train_excess_stay": excess.float(),
            "train_therapeutic": float(therapeutic),
            "train_inner_steps": float(inner),
        }
        self.log_train_losses({k.removeprefix("train_"): v for k, v in figures.items()}, batch_size=size)
        return state["supervised"].detach()

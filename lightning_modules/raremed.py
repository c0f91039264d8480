"""RAREMed (Zhao et al., SIGIR 2024): a pre-trained Transformer over one visit's codes, for rare-disease fairness.

"Leave No Patient Behind: Enhancing Medication Recommendation for Rare Disease Patients"
(arXiv 2403.17745). A visit is one *unified* sequence ``[CLS] d_1 … d_n [SEP] p_1 … p_m`` of its
diagnoses and procedures; each token's input is its code embedding + a segment embedding
(diagnosis / procedure part) + a relevance embedding (the code's rank inside its part: MIMIC lists
a visit's codes by priority, SEQ_NUM; the authors' code makes it a learned position embedding per
part, as here). A Transformer encoder reads the sequence and the output at
[CLS] is the patient representation. Training has two stages:

1. **Pre-training** (``pretrain_epochs``, the first epochs of the fit), two self-supervised tasks:
   *Sequence Matching Prediction* (SMP): from [CLS], a binary classifier tells whether the
   diagnosis part and the procedure part come from the same visit (negatives pair a visit's
   diagnoses with another visit's procedures); *Self Reconstruction* (SR): from [CLS], a
   multi-label classifier reconstructs every diagnosis and procedure code of the visit.
2. **Fine-tuning**: a linear layer from [CLS] to drug logits, loss
   (1 − α)·BCE + α·multilabel-margin + β·L_ddi, L_ddi = Σ_ij A_ij p_i p_j (mean over visits).

RAREMed reads the current visit only (no history), so visit t of a patient depends on nothing
else: all real visits of a batch are encoded at once as independent sequences (padding masks).

Fairness report: :func:`visit_rarity` scores a visit by its rarest diagnosis (the largest inverse
training frequency among its diagnoses, the authors' ``PatientWeight``: max over the visit's
diagnoses of 1/count); :func:`rarity_groups` sorts test visits from common to rare and cuts them
into ``rarity_groups`` groups of equal size (the authors' ``get_grouped_metrics``, 5 groups);
the test logs ``test_rarity_group<g>_jaccard`` (g = 1 most common … G rarest) and the groups' sizes.

Where the paper, the authors' code (github.com/zzhUSTC2016/RAREMed) and medrec differ:

* Batching: the reference steps once per visit (batch size 1, lr 1e-5, AdamW, weight decay 0.1);
  here one step per batch of patients (all their visits), so a larger lr, Adam without decay.
* Size: reference 512-d, 3 layers, 4 heads, feed-forward 2048; the config uses 128-d, 2 layers,
  feed-forward 512 so that an epoch is affordable on 2 shared CPU cores (options; see docs).
* Pre-training: the reference runs SMP for its epochs and then SR for its epochs (two runs); here
  both tasks are summed in every pre-training step (the paper presents them as one stage).
  Its SMP loss applies ``cross_entropy`` to sigmoid outputs; here the paper's binary
  cross-entropy. Negatives come from other visits of the same batch (a random cyclic shift, so
  never the visit itself; pairs whose procedure sets coincide are left out), the reference draws
  them from the whole training set. SR with ``mask_probability`` > 0 replaces codes by a [MASK]
  token (the reference also swaps 10 % for random codes; its default probability is 0, as here).
* Segments: the reference gives [SEP] the diagnosis segment; here [SEP] opens the procedure part.
* The loss weights are the reference's: α = 0.005 and β = 0.1 · 0.0005 (its DDI term is
  0.0005 · Σ p_i A_ij p_j weighted by 0.1).
* Rarity counts come from the training split (the reference counts over the whole data set,
  test included); visits are grouped, as in the reference's evaluation, each visit standing for
  the "patient" of the paper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from datamodules.batches import VisitBatch
from datamodules.errors import OptionError
from datamodules.options import DropoutRate, NonNegativeInt, PositiveInt
from lightning_modules.base import MedRecModule
from lightning_modules.ddi_loss import ddi_loss
from lightning_modules.fast_dropout import UniformDropout
from lightning_modules.metrics import visit_scores
from lightning_modules.precision import float32
from lightning_modules.visit_ops import multi_hot

log = logging.getLogger(__name__)

PretrainTask = Literal["smp", "sr"]
CLS, SEP = 0, 1  # rows of the special-token embedding
BUCKET_VISITS = 16  # visits per encoder call (RAREMed.encode_tokens); 8 and 16 timed alike, 32 slower


def visit_rarity(diagnoses: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
    """Rarity of each visit: max over its diagnoses of 1 / (training count), inf for an unseen
    code, 0 for a visit without diagnoses. ``diagnoses``/``mask`` (..., L), ``counts`` (V,): the
    training visits per code or their share (the knowledge's ``diagnosis_prevalence``; the same
    order of visits)."""
    per_code = 1.0 / counts.to(torch.float64)[diagnoses]  # 1/0 = inf: never seen in training
    per_code = torch.where(mask, per_code, torch.zeros_like(per_code))
    return per_code.amax(-1) if per_code.shape[-1] else per_code.sum(-1)


def rarity_groups(rarity: Tensor, groups: int = 5, order: Tensor | None = None) -> Tensor:
    """Group of each visit, 0 (most common) … groups − 1 (rarest): visits sorted by rarity (ties by
    ``order``, then position) and cut into chunks of ⌊n / groups⌋ + 1, the last one smaller (the
    authors' ``get_grouped_metrics``)."""
    if groups < 1:
        raise ValueError(f"rarity_groups needs at least 1 group, got {groups}")
    n = rarity.numel()
    ranks = torch.arange(n, device=rarity.device)
    if order is not None:
        ranks = torch.argsort(order, stable=True)
        rarity = rarity[ranks]
    sorted_pos = torch.argsort(rarity, stable=True)
    group = torch.empty(n, dtype=torch.long, device=rarity.device)
    group[ranks[sorted_pos]] = torch.arange(n, device=rarity.device) // (n // groups + 1)
    return group


def packed(tokens: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's real tokens moved to the front, in order, and the columns no row uses dropped.

    A visit's sequence is ``[CLS] d… [SEP] p…`` with each part padded to the batch's longest part;
    packing pads the whole visit to the batch's longest visit instead, which shortens the
    sequences the encoder's attention is quadratic in. Segment and relevance embeddings are added
    before, and the encoder has no positional term, so the real tokens' outputs do not change.
    """
    order = torch.sort(padding.to(torch.uint8), dim=1, stable=True).indices
    width = max(int((~padding).sum(1).max()) if len(padding) else 1, 1)
    order = order[:, :width]
    return tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), padding.gather(1, order)


class RAREMed(MedRecModule):
    """RAREMed: unified-sequence Transformer over a visit's codes, SMP + SR pre-training, fine-tuning.

    Args:
        embedding_dim, heads, layers, feedforward_dim, dropout: the Transformer encoder (post-norm,
            ReLU, as ``nn.TransformerEncoderLayer``'s default, the reference's choice).
        max_codes: relevance (rank) embeddings per part; codes ranked beyond share the last one.
        pretrain_epochs: the first epochs of the fit train the SMP and SR tasks only (0: no
            pre-training). Early stopping must have more patience than this.
        pretrain_tasks: which of ``smp`` and ``sr`` the pre-training uses.
        mask_probability: share of codes replaced by [MASK] in the SR input (0 = reconstruct the
            intact visit, the reference's default).
        ddi_weight: β of the fine-tuning loss (reference 0.1 × 0.0005).
        rarity_groups: number of rarity groups of the fairness report.
    """

    def __init__(
        self,
        *args,
        embedding_dim: PositiveInt = 128,
        heads: PositiveInt = 4,
        layers: PositiveInt = 2,
        feedforward_dim: PositiveInt = 512,
        dropout: DropoutRate = 0.3,
        max_codes: PositiveInt = 64,
        pretrain_epochs: NonNegativeInt = 0,
        pretrain_tasks: Sequence[PretrainTask] = ("smp", "sr"),
        mask_probability: float = 0.0,
        ddi_weight: float = 5e-5,
        rarity_groups: PositiveInt = 5,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if embedding_dim % heads:
            raise OptionError(f"embedding_dim ({embedding_dim}) must be divisible by heads ({heads})")
        if pretrain_epochs < 0:
            raise OptionError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
        tasks = tuple(pretrain_tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= {"smp", "sr"}:
            raise OptionError(f"pretrain_tasks must be a non-empty list of 'smp' and/or 'sr', got {list(tasks)}")
        if not 0.0 <= mask_probability < 1.0:
            raise OptionError(f"mask_probability must lie in [0, 1), got {mask_probability}")
        if mask_probability > 0 and (pretrain_epochs == 0 or "sr" not in tasks):
            raise OptionError("mask_probability only acts on the SR pre-training: set pretrain_epochs > 0 with 'sr'")
        if ddi_weight < 0:
            raise OptionError(f"ddi_weight must be >= 0, got {ddi_weight}")
        if rarity_groups < 1:
            raise OptionError(f"rarity_groups must be >= 1, got {rarity_groups}")
        k = self.knowledge
        self.pretrain_tasks = tasks
        self.num_diagnoses, self.num_procedures = max(k.num_diagnoses, 1), max(k.num_procedures, 1)
        # one extra row each: the [MASK] token of the SR input
        self.diagnosis_embedding = nn.Embedding(self.num_diagnoses + 1, embedding_dim)
        self.procedure_embedding = nn.Embedding(self.num_procedures + 1, embedding_dim)
        self.special_embedding = nn.Embedding(2, embedding_dim)
        self.segment_embedding = nn.Embedding(2, embedding_dim)
        self.relevance_embedding = nn.ModuleList(nn.Embedding(max_codes + 1, embedding_dim) for _ in range(2))
        for table in (self.diagnosis_embedding, self.procedure_embedding, self.special_embedding):
            nn.init.uniform_(table.weight, -0.1, 0.1)  # the reference's initialisation
        for table in (self.segment_embedding, *self.relevance_embedding):
            nn.init.uniform_(table.weight, -0.1, 0.1)
        layer = nn.TransformerEncoderLayer(
            embedding_dim, heads, dim_feedforward=feedforward_dim, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.encoder.layers:  # the same dropout, drawn from cheaper random numbers on CPU
            block.dropout, block.dropout1, block.dropout2 = (UniformDropout(dropout) for _ in range(3))
        self.output = nn.Linear(embedding_dim, k.num_medications)
        self.smp_head = nn.Linear(embedding_dim, 1)
        self.sr_head = nn.Linear(embedding_dim, self.num_diagnoses + self.num_procedures)
        if pretrain_epochs == 0:  # never used: no gradient (DDP stops at trainable unused parameters)
            self.smp_head.requires_grad_(False)
            self.sr_head.requires_grad_(False)
        # share of training-split visits per diagnosis code, for the rarity report (zeros: no report)
        shares = torch.zeros(self.num_diagnoses) if k.diagnosis_prevalence is None else k.diagnosis_prevalence
        self.register_buffer("diagnosis_prevalence", torch.as_tensor(shares, dtype=torch.float64))
        self.test_rarity = CatMetric()
        self.test_visit_jaccard = CatMetric()
        self.test_visit_key = CatMetric()

    # --- encoder -------------------------------------------------------------------------
    def encode(self, diagnoses: Tensor, diagnoses_mask: Tensor, procedures: Tensor, procedures_mask: Tensor) -> Tensor:
        """[CLS] output of ``[CLS] d… [SEP] p…`` for N visits: codes (N, L·) + masks -> (N, d)."""
        n = diagnoses.shape[0]
        device = diagnoses.device
        # drop padding columns no visit of this set uses (batches are padded to the longest visit)
        ld = max(int(diagnoses_mask.sum(-1).max()) if n else 0, 1)
        lp = max(int(procedures_mask.sum(-1).max()) if n else 0, 1)
        diagnoses, diagnoses_mask = diagnoses[:, :ld], diagnoses_mask[:, :ld]
        procedures, procedures_mask = procedures[:, :lp], procedures_mask[:, :lp]
        special = self.special_embedding.weight
        tokens = torch.cat(
            [
                special[CLS].expand(n, 1, -1),
                self.diagnosis_embedding(diagnoses),
                special[SEP].expand(n, 1, -1),
                self.procedure_embedding(procedures),
            ],
            dim=1,
        )
        segment = torch.cat(
            [torch.zeros(ld + 1, dtype=torch.long, device=device), torch.ones(lp + 1, dtype=torch.long, device=device)]
        )
        top = self.relevance_embedding[0].num_embeddings - 1
        rank_d = torch.arange(ld + 1, device=device).clamp(max=top)
        rank_p = torch.arange(lp + 1, device=device).clamp(max=top)
        position = torch.cat([self.relevance_embedding[0](rank_d), self.relevance_embedding[1](rank_p)])
        tokens = tokens + self.segment_embedding(segment)[None] + position[None]
        real = torch.ones(n, 1, dtype=torch.bool, device=device)
        tokens, padding = packed(tokens, ~torch.cat([real, diagnoses_mask, real, procedures_mask], dim=1))
        return self.encode_tokens(tokens, padding)

    def encode_tokens(self, tokens: Tensor, padding: Tensor) -> Tensor:
        """Encoder output at [CLS] of packed visits (N, L, d), run over buckets of similar length.

        Visits are sorted by length and encoded ``BUCKET_VISITS`` at a time, each bucket padded
        to its own longest visit: a batch's visits run from 3 to ~60 tokens, and padding them all
        to the longest wastes most of the attention and feed-forward work.
        """
        lengths = (~padding).sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        widths = lengths[order[::BUCKET_VISITS]].tolist()  # each bucket's longest visit, one host read
        outputs = []
        for bucket, width in zip(order.split(BUCKET_VISITS), widths):
            width = max(width, 1)
            outputs.append(self.encoder(tokens[bucket, :width], src_key_padding_mask=padding[bucket, :width])[:, 0])
        if not outputs:
            return tokens.new_zeros(0, tokens.shape[-1])
        return torch.cat(outputs)[torch.argsort(order)]

    @staticmethod
    def real_visits(batch: VisitBatch) -> dict[str, Tensor]:
        """The codes of the batch's real visits, (N, L·), in row-major (patient, visit) order."""
        mask = batch["visit_mask"]
        return {key: batch[key][mask] for key in ("diagnoses", "diagnoses_mask", "procedures", "procedures_mask")}

    def forward(self, batch: VisitBatch) -> Tensor:
        visits = self.real_visits(batch)
        logits = self.output(self.encode(**visits))
        out = logits.new_zeros(*batch["visit_mask"].shape, logits.shape[-1])
        out[batch["visit_mask"]] = logits
        return out

    # --- pre-training --------------------------------------------------------------------
    @property
    def pretraining(self) -> bool:
        return self.current_epoch < self.hparams.pretrain_epochs

    def masked(self, codes: Tensor, mask: Tensor, mask_row: int) -> Tensor:
        """Codes with a ``mask_probability`` share of the real ones replaced by the [MASK] row."""
        drop = (torch.rand(codes.shape, device=codes.device) < self.hparams.mask_probability) & mask
        return torch.where(drop, torch.full_like(codes, mask_row), codes)

    def pretrain_losses(self, batch: VisitBatch) -> dict[str, Tensor]:
        """SMP and SR losses of the batch's real visits (paper §pre-training)."""
        v = self.real_visits(batch)
        n = v["diagnoses"].shape[0]
        losses: dict[str, Tensor] = {}
        encoded = None
        if "smp" in self.pretrain_tasks and n >= 2:
            # negatives: visit i's diagnoses with visit (i + s) mod n's procedures, s in [1, n)
            partner = (torch.arange(n, device=v["diagnoses"].device) + torch.randint(1, n, (), device="cpu").item()) % n
            procs = multi_hot(v["procedures"], v["procedures_mask"], self.num_procedures)
            distinct = (procs != procs[partner]).any(-1)  # identical procedure sets are no negatives
            encoded = self.encode(
                torch.cat([v["diagnoses"], v["diagnoses"]]),
                torch.cat([v["diagnoses_mask"], v["diagnoses_mask"]]),
                torch.cat([v["procedures"], v["procedures"][partner]]),
                torch.cat([v["procedures_mask"], v["procedures_mask"][partner]]),
            )
            logit = self.smp_head(encoded).squeeze(-1)
            target = torch.cat([torch.ones(n, device=logit.device), torch.zeros(n, device=logit.device)]).to(logit)
            weight = torch.cat([torch.ones(n, dtype=torch.bool, device=logit.device), distinct]).to(logit)
            losses["smp"] = F.binary_cross_entropy_with_logits(logit, target, weight, reduction="sum") / weight.sum()
        if "sr" in self.pretrain_tasks:
            if encoded is not None and self.hparams.mask_probability == 0:
                cls = encoded[:n]  # the positives of SMP are the intact visits
            else:
                cls = self.encode(
                    self.masked(v["diagnoses"], v["diagnoses_mask"], self.num_diagnoses),
                    v["diagnoses_mask"],
                    self.masked(v["procedures"], v["procedures_mask"], self.num_procedures),
                    v["procedures_mask"],
                )
            target = torch.cat(
                [
                    multi_hot(v["diagnoses"], v["diagnoses_mask"], self.num_diagnoses),
                    multi_hot(v["procedures"], v["procedures_mask"], self.num_procedures),
                ],
                dim=-1,
            )
            losses["sr"] = F.binary_cross_entropy_with_logits(self.sr_head(cls), target)
        total = sum(losses.values()) if losses else self.special_embedding.weight.sum() * 0.0
        # the drug head takes no part here; a zero term keeps it in the graph for DDP
        losses["loss"] = total + 0.0 * (self.output.weight.sum() + self.output.bias.sum())
        return losses

    # --- fine-tuning ---------------------------------------------------------------------
    def compute_loss(self, logits: Tensor, batch: VisitBatch) -> dict[str, Tensor]:
        out = super().compute_loss(logits, batch)  # (1 − α) BCE + α margin
        with float32(logits):
            if self.hparams.ddi_weight > 0:
                out["ddi"] = ddi_loss(torch.sigmoid(logits.float()), self.ddi_adj, batch["visit_mask"])
                out["loss"] = out["loss"] + self.hparams.ddi_weight * out["ddi"]
        return out

    def training_step(self, batch: VisitBatch, batch_idx: int) -> Tensor:
        size = len(batch["lengths"])
        if self.pretraining:
            losses = self.pretrain_losses(batch)
            self.log_train_losses({f"pretrain_{k}": v for k, v in losses.items()}, batch_size=size)
            return losses["loss"]
        losses = self.compute_loss(self(batch), batch)
        if self.hparams.pretrain_epochs > 0:  # pre-training heads idle now; zero term for DDP
            idle = sum(p.sum() for head in (self.smp_head, self.sr_head) for p in head.parameters())
            losses["loss"] = losses["loss"] + 0.0 * idle
        self.log_train_losses(losses, batch_size=size)
        return losses["loss"]

    def on_fit_start(self) -> None:
        stop = self.trainer.early_stopping_callback
        epochs = self.hparams.pretrain_epochs
        if epochs and stop is not None and stop.patience <= epochs:
            raise OptionError(
                f"pretrain_epochs ({epochs}) must be smaller than the early-stopping patience ({stop.patience}): "
                "validation Jaccard cannot improve while only the pre-training tasks train"
            )

    # --- rarity report -------------------------------------------------------------------
    def test_step(self, batch: VisitBatch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if not bool(self.diagnosis_prevalence.any()):
            return
        mask = batch["visit_mask"]
        probs = self.predict_probabilities(batch).float()
        jaccard = visit_scores(probs, batch["medications"], mask, self.threshold)["jaccard"]
        rarity = visit_rarity(batch["diagnoses"], batch["diagnoses_mask"], self.diagnosis_prevalence)
        visit = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        key = batch["patient_index"][:, None] * 1000 + visit  # stable order whatever the rank split (exact in float32)
        self.test_rarity.update(rarity[mask])
        self.test_visit_jaccard.update(jaccard[mask].double())
        self.test_visit_key.update(key[mask].double())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not bool(self.diagnosis_prevalence.any()):
            log.warning("RAREMed: no training-split diagnosis prevalence; the rarity report is skipped")
            return
        rarity = self.test_rarity.compute().reshape(-1)
        jaccard = self.test_visit_jaccard.compute().reshape(-1)
        key = self.test_visit_key.compute().reshape(-1)
        groups = self.hparams.rarity_groups
        group = rarity_groups(rarity, groups, order=key)
        for g in range(groups):
            members = group == g
            mean = float(jaccard[members].mean()) if members.any() else float("nan")
            self.log(f"test_rarity_group{g + 1}_jaccard", mean, sync_dist=False, rank_zero_only=False)
            self.log(f"test_rarity_group{g + 1}_visits", float(members.sum()), sync_dist=False, rank_zero_only=False)
        for metric in (self.test_rarity, self.test_visit_jaccard, self.test_visit_key):
            metric.reset()

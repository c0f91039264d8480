"""NCF pre-training of DPR (Zheng et al., WWW 2021, §3) and the NCF / NN package baselines.

The patient U = {W, T} is embedded as u = [MLP(W) ‖ LSTM(T)] (the text branch only when the
cohort has notes); every drug j has an embedding d_j; the preference is r_ij = MLP([u ‖ d_j]),
trained with BPR over (prescribed j, not prescribed k) pairs plus L2 (Adam weight decay). The
trained u and d initialise DPR; u also defines patient similarity for the candidate sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from datamodules.batches import NCFBatch, PackageEvalBatch, PackagePairBatch, VisitDescriptions
from lightning_modules.package_rec import PackageRecModule, package_probabilities

log = logging.getLogger(__name__)


class PatientEncoder(nn.Module):
    """u = [MLP(W) ‖ LSTM(T)] (DPR §3): W the multi-hot disease document, T the note tokens.

    The first MLP layer on the multi-hot W is a sum of token embeddings (EmbeddingBag), the same
    product without materialising W.
    """

    def __init__(
        self,
        document_size: int,
        note_size: int = 0,
        dim: int = 64,
        hidden: int = 128,
        text_dim: int = 32,
        word_dim: int = 32,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.document = nn.EmbeddingBag(document_size, hidden, mode="sum")
        self.document_bias = nn.Parameter(torch.zeros(hidden))
        self.document_out = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.has_text = note_size > 0
        if self.has_text:
            self.words = nn.Embedding(note_size, word_dim)
            self.lstm = nn.LSTM(word_dim, text_dim, batch_first=True)
        self.out_dim = dim + (text_dim if self.has_text else 0)

    def forward(self, batch: VisitDescriptions) -> torch.Tensor:
        mask = batch["document_mask"]
        w = self.document(batch["document"], per_sample_weights=mask.to(self.document_bias.dtype))
        u = self.document_out(w + self.document_bias)
        if not self.has_text:
            return u
        lengths = batch["notes_lengths"]
        # pack_padded_sequence takes its lengths on the CPU: one small copy per batch
        packed = pack_padded_sequence(
            self.words(batch["notes"]), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, (hidden, _) = self.lstm(packed)
        text = hidden[-1] * (lengths > 0).unsqueeze(-1).to(hidden.dtype)  # no note: zero text part
        return torch.cat([u, text], dim=-1)


class NCFCore(nn.Module):
    """Patient encoder, drug embeddings and the preference MLP r_ij = MLP([u_i ‖ d_j]) (§3)."""

    def __init__(
        self,
        document_size: int,
        note_size: int,
        num_medications: int,
        dim: int = 64,
        hidden: int = 128,
        text_dim: int = 32,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.encoder = PatientEncoder(document_size, note_size, dim, hidden, text_dim, dropout=dropout)
        self.drugs = nn.Embedding(num_medications, dim)
        nn.init.normal_(self.drugs.weight, std=0.1)
        # The first layer on [u ‖ d_j] splits into a patient part and a drug part, so the scores
        # of every (patient, drug) pair of a batch cost two small matrix products.
        self.pair_patient = nn.Linear(self.encoder.out_dim, hidden)
        self.pair_drug = nn.Linear(dim, hidden, bias=False)
        self.pair_out = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def scores(self, batch: VisitDescriptions, u: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M) preferences r_ij of every visit for every drug."""
        u = self.encoder(batch) if u is None else u
        pair = self.pair_patient(u).unsqueeze(1) + self.pair_drug(self.drugs.weight).unsqueeze(0)
        return self.pair_out(pair).squeeze(-1)

    def loss(self, batch: NCFBatch) -> torch.Tensor:
        return bpr_drug_loss(self.scores(batch), batch["package_hot"])


def bpr_drug_loss(scores: torch.Tensor, package_hot: torch.Tensor) -> torch.Tensor:
    """BPR of NCF pre-training: mean over visits of the mean of -ln σ(r_ij - r_ik), j ∈ package, k ∉."""
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # [i, j, k] = r_ij - r_ik
    pairs = package_hot.unsqueeze(2) * (1 - package_hot).unsqueeze(1)
    per_visit = (F.softplus(-diff) * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return per_visit.mean()


def pretrain_ncf(
    core: NCFCore,
    loader,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fixed-length BPR warm start of ``core`` (DPR §3) before a DPR model trains; mean loss per epoch.

    ``on_epoch(epoch, mean loss)`` is called after each epoch (DPR logs the stage's figures with it).
    A plain loop rather than a nested Trainer: DPR runs it as its NCF stage (``DPR.ncf_stage``,
    before the first epoch of ``fit``, over the knowledge's training visits; one command trains
    DPR end to end), where a second Trainer would fight over the process, the logger and the
    strategy. To pre-train under Lightning's loop instead, fit ``configs/ncf.yaml`` and pass its
    checkpoint as DPR's ``ncf_checkpoint``.
    """
    flags = [p.requires_grad for p in core.parameters()]
    core.requires_grad_(True)
    optimizer = torch.optim.Adam(core.parameters(), lr=lr, weight_decay=weight_decay)
    was_training = core.training
    core.train()
    history = []
    with torch.enable_grad():
        for epoch in range(epochs):
            total, count = torch.zeros((), device=device), 0
            for step, batch in enumerate(loader):
                if max_batches is not None and step >= max_batches:
                    break
                batch = move_data_to_device(batch, device)
                loss = core.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.detach(), count + 1  # no host sync per step
            history.append(float(total) / max(count, 1))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
    core.train(was_training)
    for p, flag in zip(core.parameters(), flags):
        p.requires_grad_(flag)
    return history


class NCF(PackageRecModule):
    """NCF (DPR §3) as a recommender: the "NCF" and "NN" baselines of the DPR paper (§5.2).

    Args:
        recommend: ``top_k`` = the K drugs with the highest r_ij, K = the mean training package
            size (NCF baseline); ``nearest`` = the package of the most similar training patient
            (cosine of u; NN baseline).
        embedding_dim, hidden_dim, text_dim, dropout: sizes of u (document part, text part), d
            and the MLPs.
    """

    EVALUATION_SETTINGS = (*PackageRecModule.EVALUATION_SETTINGS, "recommend")

    def __init__(
        self,
        *args,
        recommend: Literal["top_k", "nearest"] = "top_k",
        embedding_dim: int = 64,
        hidden_dim: int = 128,
        text_dim: int = 32,
        dropout: float = 0.2,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        k = self.knowledge
        self.core = NCFCore(
            k.document_size, k.note_size, k.num_medications, embedding_dim, hidden_dim, text_dim, dropout
        )
        self.top_k = max(1, round(k.mean_package_size))

    def training_loss(self, batch: PackagePairBatch) -> dict[str, torch.Tensor]:
        return {"loss": self.core.loss(batch)}

    def retrieval_embedding(self, batch: VisitDescriptions) -> torch.Tensor:
        return self.core.encoder(batch)

    def visit_probabilities(self, batch: PackageEvalBatch) -> torch.Tensor:
        if self.hparams.recommend == "top_k":
            scores = self.core.scores(batch)
            top = scores.topk(min(self.top_k, scores.shape[1]), dim=1).indices
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
            level = torch.sigmoid(scores)
            return torch.where(chosen, 0.5 + 0.5 * level, 0.499 * level)
        _, similarity, packages = self.candidates(batch)
        nearest = torch.zeros(len(similarity), dtype=torch.long, device=similarity.device)
        return package_probabilities(packages, similarity, nearest, self.num_medications)

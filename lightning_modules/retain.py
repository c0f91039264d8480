"""RETAIN baseline (Choi et al., NeurIPS 2016)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from datamodules.batches import VisitBatch
from datamodules.options import DropoutRate, PositiveInt
from lightning_modules.base import MedRecModule
from lightning_modules.visit_ops import embed_codes, previous_visit


class RETAIN(MedRecModule):
    """Two-level reverse-time attention over the visit history.

    Visit embedding v_j = Σ emb(diagnoses_j) + Σ emb(procedures_j) + Σ emb(drugs_{j-1}) (drugs of
    the current visit are the target, so visit j sees the previous visit's drugs). For the
    prediction at visit t, GRU_α and GRU_β run over v_t, v_{t-1}, …, v_1 (reverse time):
    α = softmax(w_αᵀ g) (paper Eq. 5, visit level), β = tanh(W_β h) (Eq. 6, variable level),
    c_t = Σ_j α_j β_j ⊙ v_j (Eq. 7), logits = W c_t + b (Eq. 8).

    Every prefix of every patient is a separate reversed sequence; all of them are packed into
    one GRU call, so a batch costs two GRU passes regardless of how many visits it holds.
    """

    def __init__(
        self, *args, embedding_dim: PositiveInt = 64, hidden_dim: PositiveInt = 64, dropout: DropoutRate = 0.5, **kwargs
    ):
        super().__init__(*args, **kwargs)
        k = self.knowledge
        self.diag_embedding = nn.Embedding(k.num_diagnoses, embedding_dim)
        self.proc_embedding = nn.Embedding(k.num_procedures, embedding_dim)
        self.med_embedding = nn.Linear(k.num_medications, embedding_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.alpha_gru = nn.GRU(embedding_dim, hidden_dim, batch_first=True)
        self.beta_gru = nn.GRU(embedding_dim, hidden_dim, batch_first=True)
        self.alpha_out = nn.Linear(hidden_dim, 1)
        self.beta_out = nn.Linear(hidden_dim, embedding_dim)
        self.output = nn.Linear(embedding_dim, k.num_medications)

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        visits = (
            embed_codes(self.diag_embedding, batch["diagnoses"], batch["diagnoses_mask"])
            + embed_codes(self.proc_embedding, batch["procedures"], batch["procedures_mask"])
            + self.med_embedding(previous_visit(batch["medications"]))
        )
        visits = self.dropout(visits)
        mask = batch["visit_mask"]
        patient, time = mask.nonzero(as_tuple=True)  # one prediction per real visit
        steps = torch.arange(mask.shape[1], device=mask.device)
        source = time[:, None] - steps[None, :]  # reversed prefix: t, t-1, ..., 0
        valid = source >= 0
        prefixes = visits[patient[:, None], source.clamp(min=0)] * valid.unsqueeze(-1)
        lengths = (time + 1).cpu()  # pack_padded_sequence takes its lengths on the CPU
        packed = pack_padded_sequence(prefixes, lengths, batch_first=True, enforce_sorted=False)
        g, _ = pad_packed_sequence(self.alpha_gru(packed)[0], batch_first=True, total_length=mask.shape[1])
        h, _ = pad_packed_sequence(self.beta_gru(packed)[0], batch_first=True, total_length=mask.shape[1])
        alpha = self.alpha_out(g).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(-1)
        beta = torch.tanh(self.beta_out(h))
        context = (alpha.unsqueeze(-1) * beta * prefixes).sum(1)
        scores = self.output(context)
        logits = scores.new_zeros(*mask.shape, self.knowledge.num_medications)
        logits[patient, time] = scores
        return logits

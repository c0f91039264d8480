"""Vectorised helpers over padded visit batches (see datamodules/visit_sequence.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def multi_hot(codes: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """(…, L) padded indices + mask -> (…, size) 0/1 float."""
    out = torch.zeros(*codes.shape[:-1], size, device=codes.device)
    # scatter_add, not scatter: padded slots repeat index 0 and must not overwrite a real 0.
    return out.scatter_add_(-1, codes, mask.to(out.dtype)).clamp_(max=1.0)


def embed_codes(embedding: nn.Embedding, codes: torch.Tensor, mask: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Sum (or mean) of the embeddings of each visit's codes: (B, T, L) -> (B, T, d)."""
    vectors = embedding(codes) * mask.unsqueeze(-1).to(embedding.weight.dtype)
    total = vectors.sum(-2)
    if reduce == "mean":
        total = total / mask.sum(-1, keepdim=True).clamp(min=1).to(total.dtype)
    return total


def dropped_out_code_sums(
    embedding: nn.Embedding, codes: torch.Tensor, mask: torch.Tensor, dropout: nn.Module
) -> torch.Tensor:
    """Σ of the dropped-out embeddings of each visit's real codes: (B, T, L) -> (B, T, d).

    Equal in distribution to ``(dropout(embedding(codes)) * mask).sum(-2)``, but only the real codes
    are embedded and dropped out: padding is most of the (B, T, L) grid once one patient of the batch
    has many visits, and drawing dropout's random mask over it was a model's largest single cost.
    """
    mask = mask.bool()
    patient, visit, _ = mask.nonzero(as_tuple=True)
    vectors = dropout(embedding(codes[mask]))
    out = vectors.new_zeros(*codes.shape[:2], vectors.shape[-1])
    return out.index_put((patient, visit), vectors, accumulate=True)


def previous_visit(values: torch.Tensor) -> torch.Tensor:
    """Shift along time so position t holds visit t-1 (zeros at t = 0): the causal drug history."""
    return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)


def margin_targets(target: torch.Tensor) -> torch.Tensor:
    """Multi-hot (N, M) -> the index layout ``F.multilabel_margin_loss`` expects (-1 padded)."""
    order = torch.argsort(target, dim=-1, descending=True, stable=True)
    positives = target.sum(-1, keepdim=True).long()
    positions = torch.arange(target.shape[-1], device=target.device).expand_as(order)
    return torch.where(positions < positives, order, torch.full_like(order, -1))


def causal_gru(gru: nn.GRU, visits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """States of a batch-first ``gru`` over each patient's (B, T, d) visit vectors, (B, T, h): state t
    sees visits 1..t only, and padding visits never enter (packed by ``lengths``, kept on the CPU)."""
    packed = pack_padded_sequence(visits, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=visits.shape[1])[0]

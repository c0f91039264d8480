"""Differentiable DDI penalty shared by the DDI-aware recommenders (GAMENet, SafeDrug)."""

from __future__ import annotations

import torch

from lightning_modules.precision import float32


def ddi_loss(probs: torch.Tensor, ddi_adj: torch.Tensor, visit_mask: torch.Tensor) -> torch.Tensor:
    """Expected interaction mass of the predicted drug sets, averaged over real visits.

    For every real visit with drug probabilities ``p`` (length M) this is
    ``Σ_ij A_ij p_i p_j = pᵀ A p``: the pairwise predicted probabilities masked by the DDI
    adjacency ``A``, summed over ordered pairs (each interacting pair counts twice when ``A``
    is symmetric). That is GAMENet's L_DDI (Shang et al. 2019, section "Training") and SafeDrug's
    DDI loss (Yang et al. 2021) for one visit; this function returns the mean over the visits
    marked in ``visit_mask``. The reference codes scale it differently: GAMENet averages over
    the M×M entries (divide by M²), SafeDrug multiplies the sum by 0.0005.

    Args:
        probs: (B, T, M) predicted probabilities (after the sigmoid).
        ddi_adj: (M, M) 0/1 (or weighted) DDI adjacency.
        visit_mask: (B, T) bool, True for real visits.

    Returns:
        A scalar tensor (0 when no visit is real), differentiable with respect to ``probs``.
    """
    if probs.dim() != 3 or visit_mask.shape != probs.shape[:2]:
        raise ValueError(
            f"ddi_loss needs probs (B, T, M) and visit_mask (B, T), got {tuple(probs.shape)} and "
            f"{tuple(visit_mask.shape)}"
        )
    if ddi_adj.shape != (probs.shape[-1], probs.shape[-1]):
        raise ValueError(f"ddi_adj must be ({probs.shape[-1]}, {probs.shape[-1]}), got {tuple(ddi_adj.shape)}")
    with float32(probs):
        p = probs[visit_mask.bool()].float()
        if p.shape[0] == 0:
            return probs.sum().float() * 0.0
        return ((p @ ddi_adj.float()) * p).sum(-1).mean()

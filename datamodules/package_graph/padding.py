"""Padding of ragged integer lists into the fixed-width tensors of package batches."""

from __future__ import annotations

import numpy as np
import torch


def pad_packages(packages: list[np.ndarray], width: int | None = None) -> torch.Tensor:
    """List of drug-index arrays -> (G, L) long tensor padded with -1."""
    width = max([len(p) for p in packages] + [1]) if width is None else width
    out = np.full((len(packages), width), -1, dtype=np.int64)
    for i, p in enumerate(packages):
        out[i, : len(p)] = p
    return torch.from_numpy(out)


def pad_tokens(arrays: list[np.ndarray], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """List of token arrays -> ((N, L) values padded with ``fill``, (N, L) mask of real tokens), L >= 1."""
    width = max([len(a) for a in arrays] + [1])
    values = np.full((len(arrays), width), fill, dtype=np.int64)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, a in enumerate(arrays):
        values[i, : len(a)] = a
        mask[i, : len(a)] = True
    return torch.from_numpy(values), torch.from_numpy(mask)

"""Similar-patient retrieval of DPR's candidate sets (Zheng et al., WWW 2021, §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_candidates(
    query: torch.Tensor,
    query_key: torch.Tensor,
    pool: torch.Tensor,
    pool_key: torch.Tensor,
    pool_package: torch.Tensor,
    k: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packages of the ``k`` most similar pool patients (cosine), for every query at once.

    A pool entry of the query's own patient (same key) is never a candidate, so neither the
    visit itself nor another visit of the same patient can leak its package; identical
    packages of several similar patients count once (the most similar one's place). Returns
    ``(package ids (N, k), similarity (N, k))``, most similar first, padded with -1 / -inf.
    """
    if len(pool) == 0:
        empty = torch.full((len(query), k), -1, dtype=torch.long, device=query.device)
        return empty, torch.full((len(query), k), float("-inf"), device=query.device)
    similarity = F.normalize(query, dim=-1) @ F.normalize(pool, dim=-1).T
    similarity = similarity.masked_fill(query_key.unsqueeze(1) == pool_key.unsqueeze(0), float("-inf"))
    top = similarity.topk(min(k, pool.shape[0]), dim=1)
    packages = pool_package[top.indices]
    scores = top.values
    packages = packages.masked_fill(torch.isinf(scores), -1)
    # drop repeats of a package already offered by a more similar patient
    sorted_ids, order = packages.sort(dim=1, stable=True)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[:, 1:] = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    duplicate = torch.zeros_like(repeat).scatter(1, order, repeat)
    packages = packages.masked_fill(duplicate, -1)
    scores = scores.masked_fill(packages < 0, float("-inf"))
    # valid candidates first, similarity order kept
    keep = torch.argsort((packages < 0).to(torch.int8), dim=1, stable=True)
    packages, scores = packages.gather(1, keep), scores.gather(1, keep)
    if packages.shape[1] < k:
        pad = k - packages.shape[1]
        packages = F.pad(packages, (0, pad), value=-1)
        scores = F.pad(scores, (0, pad), value=float("-inf"))
    return packages, scores

"""DPR's drug relation matrix R from the sources a user may have (Zheng et al., WWW 2021, §4.1).

R is a directed (M, M) int matrix over the medication vocabulary with DPR's codes: 0 no
interaction, 1 synergism, 2 antagonism, -1 labelled pair of unknown kind. Three sources, later
ones winning where they speak about a pair:

1. the cohort's own relation labels (``drug_relations.csv`` of the cohort folder; the synthetic
   cohort has all three kinds, with directions);
2. the cohort's adverse DDI pairs read as antagonism, for pairs the cohort left unlabelled
   (MIMIC cohorts know only DDI);
3. a labelled CSV the user brings: ``drug_a, drug_b, label, direction`` where ``label`` is a
   relation name (``none``, ``synergy``, ``antagonism``, ``unknown``) or its code (0, 1, 2, -1)
   and ``direction`` is ``both`` or ``a->b``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.cohort import RELATION_CODES, CohortError

log = logging.getLogger(__name__)

CSV_COLUMNS = ("drug_a", "drug_b", "label", "direction")
_LABELS = {**RELATION_CODES, **{str(code): code for code in RELATION_CODES.values()}}


def read_relation_csv(path: str | os.PathLike, medications: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A user's labelled relation CSV -> (R, given): codes and a mask of the pairs it labels.

    Rows naming drugs outside ``medications`` are skipped (a general-purpose table usually
    covers more drugs than one cohort); a file that labels none of the cohort's drugs, an
    unknown label or direction, or missing columns is refused with a one-line CohortError.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"drug relation file {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CohortError(f"{path}: cannot be read ({err})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
    bad_label = sorted(set(frame["label"].str.strip()) - set(_LABELS))
    if bad_label:
        raise CohortError(f"{path}: unknown label(s) {bad_label}; use {sorted(RELATION_CODES)} or their codes")
    bad_direction = sorted(set(frame["direction"].str.strip()) - {"both", "a->b"})
    if bad_direction:
        raise CohortError(f"{path}: unknown direction(s) {bad_direction}; use 'both' or 'a->b'")
    index = {code: i for i, code in enumerate(medications)}
    known = frame["drug_a"].isin(index) & frame["drug_b"].isin(index)
    if not known.any():
        raise CohortError(f"{path}: none of its {len(frame)} row(s) names two drugs of this cohort's vocabulary")
    if not known.all():
        log.info("%s: %d of %d rows name drugs outside the vocabulary; skipped", path, (~known).sum(), len(frame))
    size = len(medications)
    relation = np.zeros((size, size), dtype=np.int64)
    given = np.zeros((size, size), dtype=bool)
    for row in frame[known].itertuples(index=False):
        a, b = index[row.drug_a], index[row.drug_b]
        code = _LABELS[row.label.strip()]
        relation[a, b], given[a, b] = code, True
        if row.direction.strip() == "both":
            relation[b, a], given[b, a] = code, True
    np.fill_diagonal(given, False)
    np.fill_diagonal(relation, 0)
    return relation, given


def merge_relations(
    cohort_relations: np.ndarray | None,
    ddi_adj: np.ndarray,
    ddi_as_antagonism: bool = True,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Combine the sources in the order of the module docstring."""
    size = ddi_adj.shape[0]
    relation = (
        np.zeros((size, size), dtype=np.int64) if cohort_relations is None else cohort_relations.astype(np.int64).copy()
    )
    if ddi_as_antagonism:
        adverse = ((ddi_adj != 0) | (ddi_adj != 0).T) & (relation == 0)
        relation[adverse] = RELATION_CODES["antagonism"]
    if extra is not None:
        codes, given = extra
        relation[given] = codes[given]
    np.fill_diagonal(relation, 0)
    return relation

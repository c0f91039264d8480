"""DPR's patient description U = {W, T} of every visit (Zheng et al., WWW 2021, §3).

W is a multi-hot "disease document" over diagnoses, procedures, abnormal labs, an age decade
and gender (whatever the cohort has); T the optional token sequence of the cohort's ``notes``
field (absent: the model's text branch is off). ``VisitTable`` holds both for every visit of
the cohort, with its package and owner.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from datamodules.batches import PackageVisits, VisitDescriptions
from datamodules.package_graph.padding import pad_packages, pad_tokens

AGE_DECADES = 10  # 0-9, 10-19, ..., 90+
GENDERS = ("F", "M")


def document_vocabulary(vocab: dict[str, list[str]]) -> list[str]:
    """Names of the disease-document tokens: dx:, px:, lab:, age decade, gender."""
    return (
        [f"dx:{c}" for c in vocab["diagnosis"]]
        + [f"px:{c}" for c in vocab["procedure"]]
        + [f"lab:{c}" for c in vocab.get("lab", [])]
        + [f"age:{10 * i}-{10 * i + 9}" for i in range(AGE_DECADES - 1)]
        + [f"age:{10 * (AGE_DECADES - 1)}+"]
        + [f"gender:{g}" for g in GENDERS]
    )


def visit_documents(visits: pd.DataFrame, vocab: dict[str, list[str]]) -> list[np.ndarray]:
    """W of every visit: token indices into ``document_vocabulary(vocab)``."""
    n_dx, n_px, n_lab = len(vocab["diagnosis"]), len(vocab["procedure"]), len(vocab.get("lab", []))
    age_start = n_dx + n_px + n_lab
    gender_start = age_start + AGE_DECADES
    n = len(visits)
    ages = visits["age"].to_numpy(dtype=np.float64, na_value=np.nan) if "age" in visits else np.full(n, np.nan)
    decade = np.clip(np.nan_to_num(ages, nan=-10) // 10, -1, AGE_DECADES - 1).astype(np.int64)
    genders = visits["gender"].tolist() if "gender" in visits else [None] * n
    labs = visits["labs"].tolist() if "labs" in visits else [()] * n
    documents = []
    for dx, px, lab, dec, gender in zip(visits["diagnoses"], visits["procedures"], labs, decade, genders):
        parts = [
            np.asarray(dx, np.int64),
            np.asarray(px, np.int64) + n_dx,
            np.asarray(lab if lab is not None else (), np.int64) + n_dx + n_px,
        ]
        if dec >= 0:
            parts.append(np.array([age_start + dec]))
        if gender in GENDERS:
            parts.append(np.array([gender_start + GENDERS.index(gender)]))
        documents.append(np.unique(np.concatenate(parts)))
    return documents


def note_vocabulary(token_lists, size: int) -> list[str]:
    """The ``size`` - 1 most frequent training words after the unknown-word token ``<unk>``."""
    counts = Counter(str(t) for tokens in token_lists for t in tokens)
    if not counts or size < 2:
        return []
    return ["<unk>"] + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 1]]


@dataclass
class VisitTable:
    """Every visit of the cohort as arrays (cohort order): descriptions, packages, owners."""

    document: list[np.ndarray]
    notes: list[np.ndarray]
    package: list[np.ndarray]
    patient_key: np.ndarray
    patient_id: list[str]
    visit_id: list[str]
    package_id: np.ndarray  # id among the training packages, -1 for visits outside training

    def describe(self, rows: np.ndarray) -> PackageVisits:
        """Per-visit keys shared by training and evaluation batches."""
        return {
            **describe_rows(self, rows),
            "package": pad_packages([self.package[r] for r in rows]),
            "visit_row": torch.as_tensor(rows, dtype=torch.long),
        }


def describe_rows(visits, rows: np.ndarray) -> VisitDescriptions:
    """The padded description (document and note tokens), ``patient_key`` and ``package_id`` of
    ``rows`` of a table of visits (``VisitTable`` or the knowledge's ``TrainingVisits``)."""
    document, document_mask = pad_tokens([visits.document[r] for r in rows])
    notes, notes_mask = pad_tokens([visits.notes[r] for r in rows])
    return {
        "document": document,
        "document_mask": document_mask,
        "notes": notes,
        "notes_mask": notes_mask,
        "notes_lengths": notes_mask.sum(1),
        "patient_key": torch.as_tensor(visits.patient_key[rows], dtype=torch.long),
        "package_id": torch.as_tensor(visits.package_id[rows], dtype=torch.long),
    }

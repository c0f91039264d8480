"""What a model is told about its data before training: vocabulary sizes and knowledge matrices.

A DataModule builds one ``CohortKnowledge`` from its cohort and training split; LightningCLI
hands it to the model (``link_arguments(..., apply_on="instantiate")``), so no model ever
hard-codes a vocabulary size. Checkpoints store it, and a checkpoint whose vocabularies do not
match the data it is used with is refused with a clear error.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from datamodules.cohort import CODE_COLUMNS, CODE_FIELDS, REQUIRED_COLUMNS, CohortError

ATC3_CODE = re.compile(r"^[A-Z][0-9]{2}[A-Z]$")


@lru_cache(maxsize=1)
def atc3_names() -> dict[str, str]:
    """WHO ATC level-3 class names (``resources/atc3_names.csv``), shipped: nothing is downloaded."""
    with resources.files("datamodules.resources").joinpath("atc3_names.csv").open(newline="") as fh:
        return {row["atc3"]: row["name"] for row in csv.DictReader(fh)}


def atc3_medication_names(codes: list[str]) -> list[str] | None:
    """Names of a medication vocabulary that is all ATC3 codes (a class the table lacks keeps its
    code as its name, as the MIMIC ETL does); ``None`` for any other vocabulary."""
    if not codes or not all(ATC3_CODE.match(code) for code in codes):
        return None
    names = atc3_names()
    return [names.get(code, code) for code in codes]


@dataclass
class CohortKnowledge:
    """Vocabularies, DDI adjacency, training co-prescription graph, molecules and relations."""

    vocab: dict[str, list[str]]
    ddi_adj: np.ndarray
    ehr_adj: np.ndarray
    smiles: dict[str, list[str]] = field(default_factory=dict)
    relations: np.ndarray | None = None
    medication_names: list[str] | None = None
    fields: frozenset[str] = frozenset()
    source: str = "unknown"

    def __post_init__(self) -> None:
        # Cohorts imported before the importers named their drugs (a cached benchmark import, a
        # cohort folder, an older checkpoint) still get names when their drugs are ATC3 classes.
        if self.medication_names is None:
            self.medication_names = atc3_medication_names(self.vocab.get("medication", []))

    @property
    def num_diagnoses(self) -> int:
        return len(self.vocab["diagnosis"])

    @property
    def num_procedures(self) -> int:
        return len(self.vocab["procedure"])

    @property
    def num_medications(self) -> int:
        return len(self.vocab["medication"])

    @property
    def num_labs(self) -> int:
        return len(self.vocab.get("lab", []))

    def ddi_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.ddi_adj, dtype=torch.float32)

    def ehr_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.ehr_adj, dtype=torch.float32)

    def has_field(self, name: str) -> bool:
        """An optional field the data has, or a required code column (``procedures``) with a non-empty vocabulary."""
        if name in self.fields:
            return True
        vocab = {column: code for code, column in CODE_COLUMNS.items() if column in REQUIRED_COLUMNS}.get(name)
        return vocab is not None and bool(self.vocab.get(vocab))

    def require(self, *names: str, by: str = "this model") -> None:
        missing = [n for n in names if not self.has_field(n)]
        if missing:
            raise CohortError(
                f"{by} needs visit field(s) {missing}, which the data ({self.source}) does not have; "
                f"available optional fields: {sorted(self.fields) or 'none'}"
            )

    def to_state(self) -> dict:
        """Plain-Python form stored in checkpoints."""
        return {
            "vocab": {k: list(v) for k, v in self.vocab.items()},
            "ddi_adj": self.ddi_adj.tolist(),
            "ehr_adj": self.ehr_adj.tolist(),
            "smiles": self.smiles,
            "relations": None if self.relations is None else self.relations.tolist(),
            "medication_names": self.medication_names,
            "fields": sorted(self.fields),
            "source": self.source,
        }

    @classmethod
    def from_state(cls, state: dict) -> CohortKnowledge:
        return cls(
            vocab=state["vocab"],
            ddi_adj=np.asarray(state["ddi_adj"], dtype=np.float32),
            ehr_adj=np.asarray(state["ehr_adj"], dtype=np.float32),
            smiles=state.get("smiles", {}),
            relations=None if state.get("relations") is None else np.asarray(state["relations"], dtype=np.int64),
            medication_names=state.get("medication_names"),
            fields=frozenset(state.get("fields", ())),
            source=state.get("source", "checkpoint"),
        )

    def check_compatible(self, other: CohortKnowledge, what: str = "checkpoint") -> None:
        """Raise if ``other`` (e.g. from a checkpoint) indexes codes differently from this data."""
        for name in CODE_FIELDS:
            mine, theirs = self.vocab.get(name, []), other.vocab.get(name, [])
            if mine != theirs:
                detail = f"{len(theirs)} vs {len(mine)} codes"
                if len(mine) == len(theirs):
                    first = next(i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b)
                    detail = f"index {first} is {theirs[first]!r} there, {mine[first]!r} here"
                raise CohortError(
                    f"{what} was trained on a different {name} vocabulary than this data "
                    f"({other.source} vs {self.source}: {detail}); use the data it was trained on"
                )


def co_prescription_adjacency(medication_sets: list[list[int]] | list[np.ndarray], num_medications: int) -> np.ndarray:
    """GAMENet's EHR graph: 1 where two drugs were prescribed in the same visit."""
    if not medication_sets:
        return np.zeros((num_medications, num_medications), dtype=np.float32)
    rows = np.repeat(np.arange(len(medication_sets)), [len(m) for m in medication_sets])
    cols = np.concatenate([np.asarray(m, dtype=np.int64) for m in medication_sets])
    hot = np.zeros((len(medication_sets), num_medications), dtype=np.float32)
    hot[rows, cols] = 1.0
    adj = (hot.T @ hot > 0).astype(np.float32)
    np.fill_diagonal(adj, 0.0)
    return adj

"""What a model is told about its data before training: vocabulary sizes and knowledge matrices.

A DataModule builds one ``CohortKnowledge`` from its cohort and training split; LightningCLI
hands it to the model (``link_arguments(..., apply_on="instantiate")``), so no model ever
hard-codes a vocabulary size. Everything a model derives from the training split travels here
(co-prescription graph, drug prevalence, the training stays of MiranDa's ELOS index; DPR's
candidate pool in ``PackageKnowledge``), never through ``trainer.datamodule``: a checkpoint
stores it and predicts without its DataModule. A checkpoint whose vocabularies do not match
the data it is used with is refused with a clear error.
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
from datamodules.errors import CheckpointError

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


def required(state: dict, keys, what: str) -> dict:
    """``state`` (a ``to_state`` dict a checkpoint stored) if it has every key its ``to_state``
    writes; else a one-line ``CheckpointError`` naming the missing keys. Every key is written on
    every save (``None`` where the data has no such thing), so a missing one means the state is
    not what this medrec writes, not that the data lacked something."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(
            f"the checkpoint's {what} state lacks {', '.join(map(repr, missing))}: "
            "not written by this version of medrec; train the model again"
        )
    return state


def ragged_state(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A list of integer arrays as two tensors (values, lengths): checkpoint-safe (weights_only)."""
    lengths = torch.as_tensor([len(a) for a in arrays], dtype=torch.long)
    values = np.concatenate([np.asarray(a, np.int64) for a in arrays]) if arrays else np.zeros(0, np.int64)
    return {"values": torch.from_numpy(values.astype(np.int64)), "lengths": lengths}


def from_ragged_state(state: dict) -> list[np.ndarray]:
    values = torch.as_tensor(state["values"]).numpy().astype(np.int64)
    ends = np.cumsum(torch.as_tensor(state["lengths"]).numpy())
    return [part for part in np.split(values, ends[:-1])] if len(ends) else []


@dataclass
class TrainingStays:
    """The training visits that have an age and a length of stay, as MiranDa's ELOS index
    (``lightning_modules.elos.StayIndex``, paper §2.3 ``retrieve_p`` / ``retrieve_d``) reads them.

    ``keys`` (V, 2) are ``(patient_index, visit number)`` in the training split, the batch's
    ``patient_index`` and visit position, so a training visit never retrieves itself.
    """

    procedures: list[np.ndarray]
    drugs: list[np.ndarray]
    ages: np.ndarray
    stays: np.ndarray
    keys: np.ndarray

    def __len__(self) -> int:
        return len(self.stays)

    @classmethod
    def from_sequences(cls, dataset) -> TrainingStays:
        """From a ``datamodules.visit_sequence.PatientSequences`` (or anything with its ``samples``)."""
        procedures, drugs, ages, stays, keys = [], [], [], [], []
        for sample in dataset.samples:
            for t in range(len(sample["medications"])):
                procedures.append(np.asarray(sample["procedures"][t], np.int64))
                drugs.append(np.asarray(sample["medications"][t], np.int64))
                ages.append(sample["age"][t])
                stays.append(sample["los"][t])
                keys.append((sample["patient_index"], t))
        return cls(
            procedures,
            drugs,
            np.asarray(ages, np.float32),
            np.asarray(stays, np.float32),
            np.asarray(keys, np.int64).reshape(-1, 2),
        )

    def to_state(self) -> dict:
        return {
            "procedures": ragged_state(self.procedures),
            "drugs": ragged_state(self.drugs),
            "ages": torch.from_numpy(self.ages),
            "stays": torch.from_numpy(self.stays),
            "keys": torch.from_numpy(self.keys),
        }

    @classmethod
    def from_state(cls, state: dict) -> TrainingStays:
        state = required(state, ("procedures", "drugs", "ages", "stays", "keys"), "training stays")
        return cls(
            from_ragged_state(state["procedures"]),
            from_ragged_state(state["drugs"]),
            torch.as_tensor(state["ages"]).numpy(),
            torch.as_tensor(state["stays"]).numpy(),
            torch.as_tensor(state["keys"]).numpy().reshape(-1, 2),
        )


def prevalence(code_sets, size: int) -> np.ndarray:
    """Share of ``code_sets`` (the training visits' drugs, or diagnoses) that hold each code."""
    counts = np.zeros(size, np.float32)
    for codes in code_sets:
        counts[np.unique(np.asarray(codes, np.int64))] += 1.0
    return counts / max(len(code_sets), 1)


@dataclass
class CohortKnowledge:
    """Vocabularies, DDI adjacency, molecules, relations, and what the training split tells:
    co-prescription graph (``ehr_adj``), drug and diagnosis prevalence, and the training stays of ELOS
    (``training_stays``, only when the cohort has ages and lengths of stay)."""

    vocab: dict[str, list[str]]
    ddi_adj: np.ndarray
    ehr_adj: np.ndarray
    smiles: dict[str, list[str]] = field(default_factory=dict)
    relations: np.ndarray | None = None
    medication_names: list[str] | None = None
    fields: frozenset[str] = frozenset()
    source: str = "unknown"
    drug_prevalence: np.ndarray | None = None
    diagnosis_prevalence: np.ndarray | None = None
    training_stays: TrainingStays | None = None

    def __post_init__(self) -> None:
        # Names are optional in a cohort (vocab.json may lack medication_names, e.g. a cohort
        # written by hand or by another tool): ATC3 classes still get theirs.
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
            "drug_prevalence": None if self.drug_prevalence is None else torch.from_numpy(self.drug_prevalence),
            "diagnosis_prevalence": (
                None if self.diagnosis_prevalence is None else torch.from_numpy(self.diagnosis_prevalence)
            ),
            "training_stays": None if self.training_stays is None else self.training_stays.to_state(),
        }

    STATE_KEYS = (
        "vocab",
        "ddi_adj",
        "ehr_adj",
        "smiles",
        "relations",
        "medication_names",
        "fields",
        "source",
        "drug_prevalence",
        "diagnosis_prevalence",
        "training_stays",
    )
    """What ``to_state`` writes; ``from_state`` requires every one (a value may be ``None``)."""

    @classmethod
    def from_state(cls, state: dict) -> CohortKnowledge:
        state = required(state, cls.STATE_KEYS, "knowledge")

        return cls(
            vocab=state["vocab"],
            ddi_adj=np.asarray(state["ddi_adj"], dtype=np.float32),
            ehr_adj=np.asarray(state["ehr_adj"], dtype=np.float32),
            smiles=state["smiles"],
            relations=None if state["relations"] is None else np.asarray(state["relations"], dtype=np.int64),
            medication_names=state["medication_names"],
            fields=frozenset(state["fields"]),
            source=state["source"],
            drug_prevalence=None
            if state["drug_prevalence"] is None
            else torch.as_tensor(state["drug_prevalence"]).numpy(),
            diagnosis_prevalence=(
                None
                if state["diagnosis_prevalence"] is None
                else torch.as_tensor(state["diagnosis_prevalence"]).numpy()
            ),
            training_stays=(
                None if state["training_stays"] is None else TrainingStays.from_state(state["training_stays"])
            ),
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

"""What DPR is told about its data: ``PackageKnowledge`` (vocabularies of the patient
description, package statistics, the package-graph matrices) and ``TrainingVisits``, the
training visits DPR searches for similar patients (§5) and pre-trains NCF on (§3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batches import CandidatePool, NCFBatch, VisitDescriptions
from datamodules.cohort import CohortError
from datamodules.knowledge import CohortKnowledge, from_ragged_state, ragged_state, required
from datamodules.package_graph.descriptions import describe_rows
from datamodules.package_graph.graphs import GraphMatrices, graph_matrices
from datamodules.package_graph.padding import pad_packages
from datamodules.visit_sequence import EpochShuffleSampler

DESCRIPTION_KEYS = ("document", "document_mask", "notes", "notes_mask", "notes_lengths")


class Rows(Dataset):
    """A list as a map-style dataset (items are visit rows or (patient, rows) pairs)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


@dataclass
class TrainingVisits:
    """The training visits as DPR uses them: the candidate pool of §5 and NCF's data of §3.

    Row v is a training visit (the DataModule's training order): its disease document and note
    tokens, ``patient_key`` (cohort-wide patient number: a query never gets candidates of its
    own patient) and ``package_id`` into ``packages``, the distinct training packages.
    ``similar_patients`` is the candidate-set size k; ``batch_size`` and ``seed`` how the
    DataModule batches and shuffles its training visits (NCF pre-training iterates the same way).
    """

    document: list[np.ndarray]
    notes: list[np.ndarray]
    patient_key: np.ndarray
    package_id: np.ndarray
    packages: list[np.ndarray]
    similar_patients: int = 10
    batch_size: int = 32
    seed: int = 0

    def __len__(self) -> int:
        return len(self.package_id)

    def describe(self, rows: np.ndarray | None = None) -> VisitDescriptions:
        """Description keys (``DESCRIPTION_KEYS``), ``patient_key`` and ``package_id`` of ``rows`` (all by default)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        return describe_rows(self, rows)

    def package_hot(self, rows: np.ndarray, num_medications: int) -> torch.Tensor:
        """(N, M) multi-hot packages of ``rows``."""
        hot = torch.zeros(len(rows), num_medications)
        for i, r in enumerate(rows):
            hot[i, self.packages[self.package_id[r]]] = 1.0
        return hot

    def pool(self) -> CandidatePool:
        """The candidate pool: ``describe()`` of every training visit, ``packages`` (P, L)
        (distinct training packages, -1 padded) and ``k`` (similar_patients)."""
        pool = self.describe()
        pool["packages"] = pad_packages(self.packages)
        pool["k"] = self.similar_patients
        return pool

    def loader(self, num_medications: int) -> DataLoader:
        """Batches of training visits with their ``package_hot`` (NCF pre-training, §3), shuffled
        with the DataModule's seed."""

        def collate(rows: list[int]) -> NCFBatch:
            rows = np.asarray(rows, dtype=np.int64)
            return {**self.describe(rows), "package_hot": self.package_hot(rows, num_medications)}

        return DataLoader(
            Rows(list(range(len(self)))),
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self), self.seed),
            collate_fn=collate,
        )

    def to_state(self) -> dict:
        return {
            "document": ragged_state(self.document),
            "notes": ragged_state(self.notes),
            "patient_key": torch.as_tensor(self.patient_key, dtype=torch.long),
            "package_id": torch.as_tensor(self.package_id, dtype=torch.long),
            "packages": ragged_state(self.packages),
            "similar_patients": self.similar_patients,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    STATE_KEYS = (
        "document",
        "notes",
        "patient_key",
        "package_id",
        "packages",
        "similar_patients",
        "batch_size",
        "seed",
    )

    @classmethod
    def from_state(cls, state: dict) -> TrainingVisits:
        state = required(state, cls.STATE_KEYS, "training visits")
        return cls(
            document=from_ragged_state(state["document"]),
            notes=from_ragged_state(state["notes"]),
            patient_key=torch.as_tensor(state["patient_key"]).numpy(),
            package_id=torch.as_tensor(state["package_id"]).numpy(),
            packages=from_ragged_state(state["packages"]),
            similar_patients=int(state["similar_patients"]),
            batch_size=int(state["batch_size"]),
            seed=int(state["seed"]),
        )


@dataclass
class PackageKnowledge(CohortKnowledge):
    """CohortKnowledge plus what DPR needs: document/note vocabularies and package statistics.

    ``relations`` holds the merged relation matrix R (see datamodules/drug_relations.py);
    ``cooccurrence`` the directed training proportions p_vu = num_vu / num_v; ``popularity`` the
    share of training packages holding each drug; ``mean_package_size`` the mean training
    package size (NCF's K); ``training_visits`` the candidate pool and NCF's training data.
    """

    document_vocab: list[str] = field(default_factory=list)
    note_vocab: list[str] = field(default_factory=list)
    cooccurrence: np.ndarray | None = None
    cooccurrence_threshold: float = 0.01
    popularity: np.ndarray | None = None
    mean_package_size: float = 1.0
    training_visits: TrainingVisits | None = None

    @property
    def document_size(self) -> int:
        return len(self.document_vocab)

    @property
    def note_size(self) -> int:
        """Note vocabulary size including the unknown-word token 0; 0 means no notes."""
        return len(self.note_vocab)

    def to_state(self) -> dict:
        state = super().to_state()
        state.update(
            {
                "document_vocab": list(self.document_vocab),
                "note_vocab": list(self.note_vocab),
                "cooccurrence": None if self.cooccurrence is None else self.cooccurrence.tolist(),
                "cooccurrence_threshold": self.cooccurrence_threshold,
                "popularity": None if self.popularity is None else self.popularity.tolist(),
                "mean_package_size": self.mean_package_size,
                "training_visits": None if self.training_visits is None else self.training_visits.to_state(),
            }
        )
        return state

    STATE_KEYS = (
        *CohortKnowledge.STATE_KEYS,
        "document_vocab",
        "note_vocab",
        "cooccurrence",
        "cooccurrence_threshold",
        "popularity",
        "mean_package_size",
        "training_visits",
    )

    @classmethod
    def from_state(cls, state: dict) -> PackageKnowledge:
        base = CohortKnowledge.from_state(required(state, cls.STATE_KEYS, "package knowledge"))
        return cls(
            **{name: getattr(base, name) for name in base.__dataclass_fields__},
            document_vocab=state["document_vocab"],
            note_vocab=state["note_vocab"],
            cooccurrence=None if state["cooccurrence"] is None else np.asarray(state["cooccurrence"], np.float32),
            cooccurrence_threshold=state["cooccurrence_threshold"],
            popularity=None if state["popularity"] is None else np.asarray(state["popularity"], np.float32),
            mean_package_size=state["mean_package_size"],
            training_visits=(
                None if state["training_visits"] is None else TrainingVisits.from_state(state["training_visits"])
            ),
        )

    @cached_property
    def graph_matrices(self) -> GraphMatrices:
        """R, p and the edge rule of the package graphs (§4.1), built once for the collator and the model."""
        return graph_matrices(self.relations, self.cooccurrence, self.cooccurrence_threshold)

    def check_compatible(self, other: CohortKnowledge, what: str = "checkpoint") -> None:
        super().check_compatible(other, what)
        # ``other`` may be the plain CohortKnowledge of a state (the vocabularies every model shares)
        if isinstance(other, PackageKnowledge) and list(other.document_vocab) != list(self.document_vocab):
            raise CohortError(f"{what} was trained on a different disease-document vocabulary than this data")


def cooccurrence_proportions(packages: list[np.ndarray], num_medications: int) -> np.ndarray:
    """Directed p[v, u] = num_vu / num_v over ``packages`` (0 where v never occurs; zero diagonal)."""
    hot = np.zeros((len(packages), num_medications), dtype=np.float32)
    if packages:
        rows = np.repeat(np.arange(len(packages)), [len(p) for p in packages])
        hot[rows, np.concatenate(packages).astype(np.int64)] = 1.0
    both = hot.T @ hot
    single = np.diag(both).copy()
    proportions = np.divide(both, single[:, None], out=np.zeros_like(both), where=single[:, None] > 0)
    np.fill_diagonal(proportions, 0.0)
    return proportions.astype(np.float32)

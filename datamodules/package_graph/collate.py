"""Batches of DPR's DataModule (Zheng et al., WWW 2021): training pairs and evaluation patients.

The layouts are typed and documented in ``datamodules.batches``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from datamodules.batches import PackageEvalBatch, PackageHistoryBatch, PackagePairBatch
from datamodules.knowledge import CohortKnowledge
from datamodules.package_graph.descriptions import GENDERS, VisitTable, visit_documents
from datamodules.package_graph.graphs import GraphMatrices, build_package_graphs
from datamodules.package_graph.padding import pad_packages, pad_tokens
from datamodules.visit_sequence import GENDER_CODES, VisitCollator


class PairCollator:
    """Training visits -> descriptions, true package, and r sampled negative packages as graphs.

    Negatives are packages of other training visits drawn uniformly (popular packages more
    often, as in the data), never equal to the visit's own package; sampling uses torch's
    global generator, which Lightning seeds (and re-seeds per worker).
    """

    def __init__(
        self,
        table: VisitTable,
        num_medications: int,
        matrices: GraphMatrices | None,
        pool_rows: np.ndarray,
        negatives: int,
    ):
        self.table, self.num_medications, self.matrices = table, num_medications, matrices
        self.pool_rows = torch.as_tensor(pool_rows, dtype=torch.long)
        self.pool_package = torch.as_tensor(table.package_id[pool_rows], dtype=torch.long)
        self.negatives = negatives if matrices is not None else 0

    def sample_negatives(self, own: torch.Tensor) -> torch.Tensor:
        """(N,) own package ids -> (N, r) rows of other packages' visits."""
        draw = torch.randint(len(self.pool_rows), (len(own), self.negatives))
        for _ in range(100):
            clash = self.pool_package[draw] == own.unsqueeze(1)
            if not clash.any():
                break
            draw[clash] = torch.randint(len(self.pool_rows), (int(clash.sum()),))
        return self.pool_rows[draw]

    def __call__(self, rows: list[int]) -> PackagePairBatch:
        rows = np.asarray(rows, dtype=np.int64)
        batch = self.table.describe(rows)
        hot = torch.zeros(len(rows), self.num_medications)
        for i, r in enumerate(rows):
            hot[i, self.table.package[r]] = 1.0
        batch["package_hot"] = hot
        if self.negatives > 0:
            own = torch.as_tensor(self.table.package_id[rows], dtype=torch.long)
            negative_rows = self.sample_negatives(own).numpy()
            graph_rows = np.concatenate([rows[:, None], negative_rows], axis=1).reshape(-1)
            graphs = build_package_graphs(pad_packages([self.table.package[r] for r in graph_rows]), self.matrices)
            graphs.owner = torch.arange(len(rows)).repeat_interleave(1 + self.negatives)
            batch["graphs"] = graphs
        return batch


class PatientCollator:
    """Evaluation patients -> the padded per-patient layout plus per-visit descriptions."""

    def __init__(self, table: VisitTable, num_medications: int):
        self.table, self.num_medications = table, num_medications

    def __call__(self, samples: list[tuple[int, list[int]]]) -> PackageEvalBatch:
        lengths = np.array([len(rows) for _, rows in samples])
        batch_size, max_t = len(samples), int(lengths.max())
        meds = torch.zeros(batch_size, max_t, self.num_medications)
        for b, (_, rows) in enumerate(samples):
            for t, r in enumerate(rows):
                meds[b, t, self.table.package[r]] = 1.0
        flat = np.concatenate([np.asarray(rows, np.int64) for _, rows in samples])
        batch = self.table.describe(flat)
        lengths_t = torch.from_numpy(lengths)
        batch.update(
            {
                "medications": meds,
                "visit_mask": torch.arange(max_t)[None, :] < lengths_t[:, None],
                "lengths": lengths_t,
                "patient_index": torch.tensor([i for i, _ in samples]),
                # ids as the cohort spells them (host lists: Lightning moves tensors only)
                "patient_ids": [self.table.patient_id[rows[0]] for _, rows in samples],
                "visit_ids": [[self.table.visit_id[r] for r in rows] for _, rows in samples],
            }
        )
        return batch


class HistoryCollator:
    """Patients given in the visit-sequence layout (``PatientSequences`` samples, as the
    ``Recommender`` builds them from codes) -> the evaluation batch of ``PatientCollator``.

    The descriptions come from the samples' codes, age and gender; the visits have no notes,
    belong to no training patient (``patient_key`` -1) and to no training package.
    """

    def __init__(self, knowledge: CohortKnowledge):
        self.knowledge = knowledge

    def __call__(self, samples: list[dict]) -> PackageHistoryBatch:
        batch = VisitCollator(self.knowledge.num_medications)(samples)
        gender_of = {code: name for name, code in GENDER_CODES.items() if name in GENDERS}
        visits = [(s, t) for s in samples for t in range(len(s["medications"]))]  # row-major, as visit_mask
        frame = pd.DataFrame(
            {
                "diagnoses": [s["diagnoses"][t] for s, t in visits],
                "procedures": [s["procedures"][t] for s, t in visits],
                "labs": [s["labs"][t] for s, t in visits],
                "age": [float(s["age"][t]) for s, t in visits],
                "gender": [gender_of.get(s["gender"]) for s, t in visits],
            }
        )
        document, document_mask = pad_tokens(visit_documents(frame, self.knowledge.vocab))
        notes, notes_mask = pad_tokens([np.zeros(0, np.int64)] * len(visits))
        none = torch.full((len(visits),), -1, dtype=torch.long)
        batch.update(
            {
                "document": document,
                "document_mask": document_mask,
                "notes": notes,
                "notes_mask": notes_mask,
                "notes_lengths": notes_mask.sum(1),
                "patient_key": none,
                "package": pad_packages([np.unique(s["medications"][t]) for s, t in visits]),
                "package_id": none.clone(),
                "visit_row": none.clone(),
            }
        )
        return batch

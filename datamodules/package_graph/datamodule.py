"""``PackageGraphDataModule``: DPR's data (Zheng et al., WWW 2021, §4–5)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from datamodules.batches import CandidatePool
from datamodules.cohort import CODE_COLUMNS
from datamodules.drug_relations import merge_relations, read_relation_csv
from datamodules.knowledge import co_prescription_adjacency, prevalence
from datamodules.options import NonNegativeInt, PositiveInt
from datamodules.package_graph.collate import PairCollator, PatientCollator
from datamodules.package_graph.descriptions import VisitTable, document_vocabulary, note_vocabulary, visit_documents
from datamodules.package_graph.knowledge import PackageKnowledge, Rows, TrainingVisits, cooccurrence_proportions
from datamodules.visit_sequence import EpochShuffleSampler, VisitSequenceDataModule


class PackageGraphDataModule(VisitSequenceDataModule):
    """DPR's data: visits as patients with packages, package graphs, candidate pool (§4–5).

    Loading, splitting and the options shared with ``VisitSequenceDataModule`` are inherited
    (same cohort, same patient split, so DPR is evaluated on the same test patients as the
    sequence methods, every visit of each). Additional options:

    Args:
        negative_packages: negative packages per training pair (the paper's ratio, 10); 0 trains
            without graphs (NCF).
        similar_patients: evaluation candidates = packages of this many most similar training
            visits (cosine of the model's pre-trained patient embeddings).
        cooccurrence_threshold: p_vu above which two drugs of a package are linked (0.01).
        relations_csv: a labelled relation CSV (drug_a, drug_b, label, direction) overriding
            the cohort's labels; see datamodules/drug_relations.py.
        ddi_as_antagonism: read the cohort's adverse DDI pairs as antagonism where unlabelled.
        note_vocab_size: words kept from the training notes (incl. the unknown word).
    """

    def __init__(
        self,
        negative_packages: NonNegativeInt = 10,
        similar_patients: PositiveInt = 10,
        cooccurrence_threshold: float = 0.01,
        relations_csv: str | None = None,
        ddi_as_antagonism: bool = True,
        note_vocab_size: PositiveInt = 10000,
        **kwargs,
    ):
        super().__init__(**kwargs)  # root, split, batch_size, ...: VisitSequenceDataModule's options
        if negative_packages < 0 or similar_patients < 1:
            raise ValueError(
                f"need negative_packages >= 0 and similar_patients >= 1, got {negative_packages}, {similar_patients}"
            )
        if not 0.0 <= cooccurrence_threshold < 1.0:
            raise ValueError(f"cooccurrence_threshold must lie in [0, 1), got {cooccurrence_threshold}")
        self.negative_packages = int(negative_packages)  # parsed range types -> builtins
        self.similar_patients = int(similar_patients)
        self.cooccurrence_threshold = float(cooccurrence_threshold)
        self.relations_csv = relations_csv
        self.ddi_as_antagonism = ddi_as_antagonism
        self.note_vocab_size = int(note_vocab_size)
        self._table: VisitTable | None = None
        self._split_rows: dict[str, list[list[int]]] = {}

    # --- visits ------------------------------------------------------------------------
    def split_rows(self, name: str) -> list[list[int]]:
        """Visit-table rows of every patient of a split (last ``max_visits`` kept), split order."""
        if name not in self._split_rows:
            groups = self.cohort.visits.groupby("patient_id", sort=False).indices
            rows = []
            for pid in self.splits[name]:
                patient_rows = [int(i) for i in groups[pid]]  # cohort visits are in (patient, order)
                if self.max_visits is not None:
                    patient_rows = patient_rows[-self.max_visits :]
                rows.append(patient_rows)
            self._split_rows[name] = rows
        return self._split_rows[name]

    def train_rows(self) -> np.ndarray:
        return np.asarray([r for rows in self.split_rows("train") for r in rows], dtype=np.int64)

    @property
    def table(self) -> VisitTable:
        if self._table is None:
            cohort = self.cohort
            visits = cohort.visits
            packages = [np.unique(np.asarray(m, np.int64)) for m in visits["medications"]]
            train = self.train_rows()
            package_id = np.full(len(visits), -1, dtype=np.int64)
            ids: dict[tuple, int] = {}
            for r in train:
                package_id[r] = ids.setdefault(tuple(packages[r].tolist()), len(ids))
            notes_vocab = self._note_vocab()
            index = {w: i for i, w in enumerate(notes_vocab)}
            if notes_vocab and "notes" in visits.columns:
                notes = [
                    np.asarray([index.get(str(w), 0) for w in (tokens if tokens is not None else ())], np.int64)
                    for tokens in visits["notes"]
                ]
            else:
                notes = [np.zeros(0, np.int64)] * len(visits)
            keys = {pid: i for i, pid in enumerate(dict.fromkeys(visits["patient_id"]))}
            self._table = VisitTable(
                document=visit_documents(visits, cohort.vocab),
                notes=notes,
                package=packages,
                patient_key=visits["patient_id"].map(keys).to_numpy(np.int64),
                patient_id=visits["patient_id"].tolist(),
                visit_id=visits["visit_id"].tolist(),
                package_id=package_id,
            )
        return self._table

    def _note_vocab(self) -> list[str]:
        visits = self.cohort.visits
        if "notes" not in visits.columns:
            return []
        train = self.train_rows()
        tokens = [t for t in visits["notes"].iloc[train] if t is not None]
        return note_vocabulary(tokens, self.note_vocab_size)

    # --- knowledge ---------------------------------------------------------------------
    @property
    def knowledge(self) -> PackageKnowledge:
        if self._knowledge is None:
            cohort = self.cohort
            train = self.train_rows()
            n_med = cohort.vocab_size("medication")
            train_packages = [np.unique(np.asarray(cohort.visits["medications"].iloc[r], np.int64)) for r in train]
            ddi = cohort.ddi_adjacency()
            extra = read_relation_csv(self.relations_csv, cohort.vocab["medication"]) if self.relations_csv else None
            popularity = prevalence(train_packages, n_med)
            self._knowledge = PackageKnowledge(
                vocab={name: list(cohort.vocab[name]) for name in CODE_COLUMNS},
                ddi_adj=ddi,
                ehr_adj=co_prescription_adjacency(train_packages, n_med),
                smiles=dict(cohort.smiles),
                relations=merge_relations(cohort.relation_matrix(), ddi, self.ddi_as_antagonism, extra),
                medication_names=cohort.medication_names,
                fields=frozenset(cohort.fields),
                source=cohort.source,
                drug_prevalence=popularity,
                document_vocab=document_vocabulary(cohort.vocab),
                note_vocab=self._note_vocab(),
                cooccurrence=cooccurrence_proportions(train_packages, n_med),
                cooccurrence_threshold=self.cooccurrence_threshold,
                popularity=popularity,
                mean_package_size=float(np.mean([len(p) for p in train_packages])),
                training_visits=self._training_visits(),
            )
        return self._knowledge

    def _training_visits(self) -> TrainingVisits:
        """The training visits in training order, with the distinct training packages."""
        table, rows = self.table, self.train_rows()
        first: dict[int, int] = {}
        for r in rows:
            first.setdefault(int(table.package_id[r]), int(r))
        return TrainingVisits(
            document=[table.document[r] for r in rows],
            notes=[table.notes[r] for r in rows],
            patient_key=table.patient_key[rows],
            package_id=table.package_id[rows],
            packages=[table.package[first[pid]] for pid in sorted(first)],  # ids are 0..P-1, first-seen order
            # plain ints: the knowledge goes into checkpoints, which load with weights_only
            similar_patients=int(self.similar_patients),
            batch_size=int(self.batch_size),
            seed=int(self.seed),
        )

    def candidate_pool(self) -> CandidatePool:
        """The training visits a model searches for similar patients (``TrainingVisits.pool``)."""
        return self.knowledge.training_visits.pool()

    # --- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        _ = self.table, self.knowledge

    def dataset(self, name: str) -> Rows:
        """Patients of a split as (index, visit rows); the collator adds their ids to the batch."""
        if name not in self._datasets:
            self._datasets[name] = Rows(list(enumerate(self.split_rows(name))))
        return self._datasets[name]

    def pair_collator(self, negatives: int | None = None) -> PairCollator:
        negatives = self.negative_packages if negatives is None else negatives
        matrices = self.knowledge.graph_matrices if negatives else None
        return PairCollator(self.table, self.knowledge.num_medications, matrices, self.train_rows(), negatives)

    def train_dataloader(self) -> DataLoader:
        return self._visit_loader(self.negative_packages)

    def _visit_loader(self, negatives: int) -> DataLoader:
        rows = Rows(self.train_rows().tolist())
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(rows), self.seed),
            num_workers=self.num_workers,
            pin_memory=self.loader_pins_memory(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.pair_collator(negatives),
        )

    def _collator(self):
        """Evaluation batches (validation, test, predict): every visit of each patient, with packages;
        the parent's loader gives each evaluation patient to exactly one DDP rank."""
        return PatientCollator(self.table, self.knowledge.num_medications)

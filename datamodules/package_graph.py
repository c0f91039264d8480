"""Drug package graphs and the package-graph DataModule of DPR (Zheng et al., WWW 2021).

DPR treats every admission as a "patient" U = {W, T} whose prescription is a *package* of
drugs, and recommends by scoring whole packages. This module holds the data side:

* the patient description: W, a multi-hot "disease document" over diagnoses, procedures,
  abnormal labs, an age decade and gender (whatever the cohort has), and T, the optional token
  sequence of the cohort's ``notes`` field (absent: the model's text branch is off);
* the package graph of §4.1: nodes = the package's drugs; a directed edge v→u when the
  relation matrix labels the pair (R_vu ≠ 0) or the training co-occurrence proportion
  p_vu = num_vu / num_v exceeds a threshold (0.01 in the paper). ``PackageGraphBuilder`` builds
  the graphs of any number of packages at once, with tensor operations only, into one
  torch-geometric ``Batch`` whose edges carry ``relation`` (R_vu) and ``cooccurrence`` (p_vu);
* ``PackageGraphDataModule``: training pairs (patient, own package) with negative packages
  sampled from other training patients; evaluation batches grouped by patient in the layout
  of ``VisitSequenceDataModule`` (so the shared metrics apply unchanged) plus every visit's
  description, and the candidate pool (training visits, their packages) that the model
  searches for the most similar patients (``nearest_candidates``).

Evaluation batch (patients B, visits T, real visits N = visit_mask.sum(), drugs M):

=================  ===============  =========================================================
key                shape            meaning
=================  ===============  =========================================================
medications        (B, T, M) float  true package of every visit (the target)
visit_mask         (B, T) bool      real visits; lengths (B,), patient_index (B,)
document           (N, Lw) long     disease-document tokens of each real visit (row-major
                                    order of visit_mask.nonzero()); ``document_mask``
notes              (N, Ln) long     note tokens (0 = unknown word); ``notes_lengths`` (N,)
patient_key        (N,) long        cohort-wide patient number (candidates never share it)
package            (N, Lp) long     true package as drug indices, -1 padded
package_id         (N,) long        id of that package among the training packages (-1: none)
visit_row          (N,) long        row in the DataModule's visit table (ids for records)
=================  ===============  =========================================================

A training batch has the same per-visit keys (N = batch size) plus ``package_hot`` (N, M) and,
with negative packages, ``graphs``: the Batch of N·(1+r) graphs, visit i's true package at
graph i·(1+r) and its r negatives after it; ``graphs.owner`` maps each graph to its visit.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch_geometric.data import Batch, Data

from datamodules.cohort import CODE_COLUMNS, CohortError
from datamodules.drug_relations import merge_relations, read_relation_csv
from datamodules.knowledge import CohortKnowledge, co_prescription_adjacency
from datamodules.sources import Source
from datamodules.visit_sequence import EpochShuffleSampler, VisitSequenceDataModule

log = logging.getLogger(__name__)

AGE_DECADES = 10  # 0-9, 10-19, ..., 90+
GENDERS = ("F", "M")
EDGE_KEYS = ("edge_index", "relation", "cooccurrence")


# ---------------------------------------------------------------------------------------
# knowledge
# ---------------------------------------------------------------------------------------
@dataclass
class PackageKnowledge(CohortKnowledge):
    """CohortKnowledge plus what DPR needs: document/note vocabularies and package statistics.

    ``relations`` holds the merged relation matrix R (see datamodules/drug_relations.py);
    ``cooccurrence`` the directed training proportions p_vu = num_vu / num_v; ``popularity`` the
    share of training packages holding each drug; ``mean_package_size`` the mean training
    package size (NCF's K).
    """

    document_vocab: list[str] = field(default_factory=list)
    note_vocab: list[str] = field(default_factory=list)
    cooccurrence: np.ndarray | None = None
    cooccurrence_threshold: float = 0.01
    popularity: np.ndarray | None = None
    mean_package_size: float = 1.0

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
            }
        )
        return state

    @classmethod
    def from_state(cls, state: dict) -> PackageKnowledge:
        base = CohortKnowledge.from_state(state)
        return cls(
            **{name: getattr(base, name) for name in base.__dataclass_fields__},
            document_vocab=state.get("document_vocab", []),
            note_vocab=state.get("note_vocab", []),
            cooccurrence=None if state.get("cooccurrence") is None else np.asarray(state["cooccurrence"], np.float32),
            cooccurrence_threshold=state.get("cooccurrence_threshold", 0.01),
            popularity=None if state.get("popularity") is None else np.asarray(state["popularity"], np.float32),
            mean_package_size=state.get("mean_package_size", 1.0),
        )

    def check_compatible(self, other: CohortKnowledge, what: str = "checkpoint") -> None:
        super().check_compatible(other, what)
        theirs = getattr(other, "document_vocab", None)
        if theirs is not None and theirs and list(theirs) != list(self.document_vocab):
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


# ---------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------
def package_graph(drugs, relation: np.ndarray, cooccurrence: np.ndarray, threshold: float) -> Data:
    """Reference construction of one package graph (§4.1), for tests and inspection.

    Nodes are the package's drugs in the given order; edge v→u for every ordered pair of distinct
    drugs with R[v, u] ≠ 0 or p[v, u] > threshold, in row-major (v, u) order.
    """
    drugs = [int(d) for d in drugs]
    src, dst = [], []
    for a, v in enumerate(drugs):
        for b, u in enumerate(drugs):
            if a != b and (relation[v, u] != 0 or cooccurrence[v, u] > threshold):
                src.append(a)
                dst.append(b)
    pairs = (np.asarray([drugs[a] for a in src], np.int64), np.asarray([drugs[b] for b in dst], np.int64))
    return Data(
        x=torch.tensor(drugs, dtype=torch.long),
        edge_index=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
        relation=torch.as_tensor(relation[pairs], dtype=torch.long),
        cooccurrence=torch.as_tensor(cooccurrence[pairs], dtype=torch.float32),
    )


class PackageGraphBuilder(nn.Module):
    """Builds the package graphs of a whole batch of packages at once (§4.1).

    ``build(packages)`` takes a (G, L) long tensor of drug indices padded with -1 and returns
    one torch-geometric ``Batch`` of G graphs: ``x`` (drug index of every node), ``edge_index``,
    per-edge ``relation`` (R_vu, DPR's codes) and ``cooccurrence`` (p_vu), ``batch``/``ptr``,
    and ``num_drugs`` (nodes per graph). It is equal, graph by graph, to ``package_graph`` and to
    ``Batch.from_data_list`` of those graphs (``to_data_list`` works), but costs a handful of
    tensor operations instead of a Python loop over graphs, so it runs inside ``forward`` for
    the evaluation candidates as well as in the training collator. The matrices are
    non-persistent buffers: they belong to the data, and move with the model's device.
    """

    def __init__(self, relation: np.ndarray, cooccurrence: np.ndarray, threshold: float = 0.01):
        super().__init__()
        relation = torch.as_tensor(np.asarray(relation), dtype=torch.long)
        cooccurrence = torch.as_tensor(np.asarray(cooccurrence), dtype=torch.float32)
        if relation.shape != cooccurrence.shape or relation.dim() != 2 or relation.shape[0] != relation.shape[1]:
            raise ValueError(
                f"relation {tuple(relation.shape)} and cooccurrence {tuple(cooccurrence.shape)} must be equal (M, M)"
            )
        adjacency = (relation != 0) | (cooccurrence > threshold)
        adjacency.fill_diagonal_(False)
        self.threshold = float(threshold)
        self.register_buffer("relation", relation, persistent=False)
        self.register_buffer("cooccurrence", cooccurrence, persistent=False)
        self.register_buffer("adjacency", adjacency, persistent=False)

    @classmethod
    def from_knowledge(cls, knowledge: PackageKnowledge) -> PackageGraphBuilder:
        return cls(knowledge.relations, knowledge.cooccurrence, knowledge.cooccurrence_threshold)

    def build(self, packages: torch.Tensor) -> Batch:
        packages = packages.to(self.adjacency.device)
        if packages.dim() != 2:
            raise ValueError(f"packages must be (G, L) drug indices padded with -1, got {tuple(packages.shape)}")
        num_graphs, width = packages.shape
        valid = packages >= 0
        sizes = valid.sum(1)
        graph_of_node, slot = valid.nonzero(as_tuple=True)
        x = packages[graph_of_node, slot]
        node_id = torch.full_like(packages, -1)
        node_id[valid] = torch.arange(len(x), device=packages.device)
        safe = packages.clamp(min=0)
        pairs = valid.unsqueeze(2) & valid.unsqueeze(1)
        pairs &= ~torch.eye(width, dtype=torch.bool, device=packages.device)
        pairs &= self.adjacency[safe.unsqueeze(2), safe.unsqueeze(1)]
        graph_of_edge, a, b = pairs.nonzero(as_tuple=True)
        src, dst = node_id[graph_of_edge, a], node_id[graph_of_edge, b]
        drug_src, drug_dst = x[src], x[dst]
        ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        edges = pairs.sum((1, 2))
        edge_ptr = torch.cat([edges.new_zeros(1), edges.cumsum(0)])
        graphs = Batch(
            _base_cls=Data,
            x=x,
            edge_index=torch.stack([src, dst]),
            relation=self.relation[drug_src, drug_dst],
            cooccurrence=self.cooccurrence[drug_src, drug_dst],
            num_drugs=sizes,
            batch=graph_of_node,
            ptr=ptr,
        )
        # What Batch.from_data_list would record, so to_data_list()/get_example() work.
        zeros = sizes.new_zeros(num_graphs)
        graphs._num_graphs = num_graphs
        graphs._slice_dict = {
            "x": ptr,
            "edge_index": edge_ptr,
            "relation": edge_ptr,
            "cooccurrence": edge_ptr,
            "num_drugs": torch.arange(num_graphs + 1, device=ptr.device),
        }
        graphs._inc_dict = {key: zeros for key in graphs._slice_dict}
        graphs._inc_dict["edge_index"] = ptr[:-1]
        return graphs


def pad_packages(packages: list[np.ndarray], width: int | None = None) -> torch.Tensor:
    """List of drug-index arrays -> (G, L) long tensor padded with -1."""
    width = max([len(p) for p in packages] + [1]) if width is None else width
    out = np.full((len(packages), width), -1, dtype=np.int64)
    for i, p in enumerate(packages):
        out[i, : len(p)] = p
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# patient descriptions
# ---------------------------------------------------------------------------------------
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


def _pad(arrays: list[np.ndarray], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(a) for a in arrays] + [1])
    values = np.full((len(arrays), width), fill, dtype=np.int64)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, a in enumerate(arrays):
        values[i, : len(a)] = a
        mask[i, : len(a)] = True
    return torch.from_numpy(values), torch.from_numpy(mask)


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

    def describe(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Per-visit keys shared by training and evaluation batches."""
        document, document_mask = _pad([self.document[r] for r in rows])
        notes, notes_mask = _pad([self.notes[r] for r in rows])
        return {
            "document": document,
            "document_mask": document_mask,
            "notes": notes,
            "notes_mask": notes_mask,
            "notes_lengths": notes_mask.sum(1),
            "patient_key": torch.as_tensor(self.patient_key[rows], dtype=torch.long),
            "package": pad_packages([self.package[r] for r in rows]),
            "package_id": torch.as_tensor(self.package_id[rows], dtype=torch.long),
            "visit_row": torch.as_tensor(rows, dtype=torch.long),
        }


class _Rows(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


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
        builder: PackageGraphBuilder | None,
        pool_rows: np.ndarray,
        negatives: int,
    ):
        self.table, self.num_medications, self.builder = table, num_medications, builder
        self.pool_rows = torch.as_tensor(pool_rows, dtype=torch.long)
        self.pool_package = torch.as_tensor(table.package_id[pool_rows], dtype=torch.long)
        self.negatives = negatives if builder is not None else 0

    def sample_negatives(self, own: torch.Tensor) -> torch.Tensor:
        """(N,) own package ids -> (N, r) rows of other packages' visits."""
        draw = torch.randint(len(self.pool_rows), (len(own), self.negatives))
        for _ in range(100):
            clash = self.pool_package[draw] == own.unsqueeze(1)
            if not clash.any():
                break
            draw[clash] = torch.randint(len(self.pool_rows), (int(clash.sum()),))
        return self.pool_rows[draw]

    def __call__(self, rows: list[int]) -> dict:
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
            graphs = self.builder.build(pad_packages([self.table.package[r] for r in graph_rows]))
            graphs.owner = torch.arange(len(rows)).repeat_interleave(1 + self.negatives)
            batch["graphs"] = graphs
        return batch


class PatientCollator:
    """Evaluation patients -> the padded per-patient layout plus per-visit descriptions."""

    def __init__(self, table: VisitTable, num_medications: int):
        self.table, self.num_medications = table, num_medications

    def __call__(self, samples: list[tuple[int, list[int]]]) -> dict:
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
            }
        )
        return batch


# ---------------------------------------------------------------------------------------
# the DataModule
# ---------------------------------------------------------------------------------------
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
        root: str | None = None,
        source: Source = "auto",
        split: Literal["safedrug", "random"] = "safedrug",
        split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        min_visits: int = 1,
        max_visits: int | None = None,
        synthetic_patients: int = 2000,
        synthetic_seed: int = 0,
        synthetic_options: dict[str, int | float] | None = None,
        cache_dir: str | None = None,
        mappings: str | None = None,
        negative_packages: int = 10,
        similar_patients: int = 10,
        cooccurrence_threshold: float = 0.01,
        relations_csv: str | None = None,
        ddi_as_antagonism: bool = True,
        note_vocab_size: int = 10000,
    ):
        super().__init__(
            root=root,
            source=source,
            split=split,
            split_ratios=split_ratios,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            min_visits=min_visits,
            max_visits=max_visits,
            synthetic_patients=synthetic_patients,
            synthetic_seed=synthetic_seed,
            synthetic_options=synthetic_options,
            cache_dir=cache_dir,
            mappings=mappings,
        )
        if negative_packages < 0 or similar_patients < 1:
            raise ValueError(
                f"need negative_packages >= 0 and similar_patients >= 1, got {negative_packages}, {similar_patients}"
            )
        if not 0.0 <= cooccurrence_threshold < 1.0:
            raise ValueError(f"cooccurrence_threshold must lie in [0, 1), got {cooccurrence_threshold}")
        self.negative_packages = negative_packages
        self.similar_patients = similar_patients
        self.cooccurrence_threshold = cooccurrence_threshold
        self.relations_csv = relations_csv
        self.ddi_as_antagonism = ddi_as_antagonism
        self.note_vocab_size = note_vocab_size
        self._table: VisitTable | None = None
        self._split_rows: dict[str, list[list[int]]] = {}
        self._builder: PackageGraphBuilder | None = None
        self._pool: dict | None = None

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
            popularity = np.zeros(n_med, np.float32)
            for p in train_packages:
                popularity[p] += 1.0
            self._knowledge = PackageKnowledge(
                vocab={name: list(cohort.vocab[name]) for name in CODE_COLUMNS},
                ddi_adj=ddi,
                ehr_adj=co_prescription_adjacency(train_packages, n_med),
                smiles=dict(cohort.smiles),
                relations=merge_relations(cohort.relation_matrix(), ddi, self.ddi_as_antagonism, extra),
                medication_names=cohort.medication_names,
                fields=frozenset(cohort.fields),
                source=cohort.source,
                document_vocab=document_vocabulary(cohort.vocab),
                note_vocab=self._note_vocab(),
                cooccurrence=cooccurrence_proportions(train_packages, n_med),
                cooccurrence_threshold=self.cooccurrence_threshold,
                popularity=popularity / max(len(train_packages), 1),
                mean_package_size=float(np.mean([len(p) for p in train_packages])),
            )
        return self._knowledge

    @property
    def builder(self) -> PackageGraphBuilder:
        if self._builder is None:
            self._builder = PackageGraphBuilder.from_knowledge(self.knowledge)
        return self._builder

    def candidate_pool(self) -> dict:
        """The training visits a model searches for similar patients, and their packages.

        Keys: the per-visit description keys of ``VisitTable.describe`` for every training visit,
        ``package_id`` (P_v,) into ``packages`` (P, L) (distinct training packages, -1 padded),
        and ``k`` (similar_patients).
        """
        if self._pool is None:
            table, rows = self.table, self.train_rows()
            pool = table.describe(rows)
            first: dict[int, int] = {}
            for r in rows:
                first.setdefault(int(table.package_id[r]), int(r))
            distinct = sorted(first)  # ids are 0..P-1 in first-seen order
            pool["package_id"] = torch.as_tensor(table.package_id[rows], dtype=torch.long)
            pool["packages"] = pad_packages([table.package[first[pid]] for pid in distinct])
            pool["k"] = self.similar_patients
            self._pool = pool
        return self._pool

    # --- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        _ = self.table, self.knowledge

    def dataset(self, name: str) -> _Rows:
        """Patients of a split as (index, visit rows); ``patient_ids`` and ``samples`` as the base."""
        if name not in self._datasets:
            rows = self.split_rows(name)
            data = _Rows(list(enumerate(rows)))
            data.patient_ids = list(self.splits[name])
            data.samples = [{"visit_ids": [self.table.visit_id[r] for r in patient]} for patient in rows]
            self._datasets[name] = data
        return self._datasets[name]

    def pair_collator(self, negatives: int | None = None) -> PairCollator:
        negatives = self.negative_packages if negatives is None else negatives
        builder = self.builder if negatives else None
        return PairCollator(self.table, self.knowledge.num_medications, builder, self.train_rows(), negatives)

    def train_dataloader(self) -> DataLoader:
        return self._visit_loader(self.negative_packages)

    def pretrain_dataloader(self) -> DataLoader:
        """Training visits without graphs, for NCF pre-training (§3)."""
        return self._visit_loader(0)

    def _visit_loader(self, negatives: int) -> DataLoader:
        rows = _Rows(self.train_rows().tolist())
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(rows), self.seed),
            num_workers=self.num_workers,
            pin_memory=self.loader_pins_memory(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.pair_collator(negatives),
        )

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(name)
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each evaluation patient on exactly one rank (the default sampler repeats some)
            world = torch.distributed.get_world_size()
            if world > 1:
                sampler = UnrepeatedDistributedSampler(
                    dataset, num_replicas=world, rank=torch.distributed.get_rank(), shuffle=False
                )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.loader_pins_memory(),
            persistent_workers=self.num_workers > 0,
            collate_fn=PatientCollator(self.table, self.knowledge.num_medications),
        )

"""Drug package graphs and the package-graph DataModule of DPR (Zheng et al., WWW 2021).

DPR treats every admission as a "patient" U = {W, T} whose prescription is a *package* of
drugs, and recommends by scoring whole packages. This package holds the data side, one module
per job: ``descriptions`` (W and T), ``graphs`` (§4.1), ``knowledge`` (``PackageKnowledge``,
``TrainingVisits``), ``collate`` (the batches below) and ``datamodule``:

* the patient description: W, a multi-hot "disease document" over diagnoses, procedures,
  abnormal labs, an age decade and gender (whatever the cohort has), and T, the optional token
  sequence of the cohort's ``notes`` field (absent: the model's text branch is off);
* the package graph of §4.1: nodes = the package's drugs; a directed edge v→u when the
  relation matrix labels the pair (R_vu ≠ 0) or the training co-occurrence proportion
  p_vu = num_vu / num_v exceeds a threshold (0.01 in the paper). ``build_package_graphs`` builds
  the graphs of any number of packages at once, with tensor operations only, into one
  torch-geometric ``Batch`` whose edges carry ``relation`` (R_vu) and ``cooccurrence`` (p_vu)
  (``split_package_graphs`` gives them back one by one);
* ``PackageGraphDataModule``: training pairs (patient, own package) with negative packages
  sampled from other training patients; evaluation batches grouped by patient in the layout
  of ``VisitSequenceDataModule`` (so the shared metrics apply unchanged) plus every visit's
  description. The candidate pool (training visits, their packages) that the model searches for
  the most similar patients travels in the knowledge (``PackageKnowledge.training_visits``).

The batches are typed in ``datamodules.batches`` (each key's dtype, shape and meaning):
``PackagePairBatch`` (training: every visit's description, true package and, with negative packages,
``graphs``, the Batch of the true and negative packages' graphs), ``PackageEvalBatch`` (evaluation:
the per-patient targets of ``VisitSequenceDataModule``'s layout plus one description per real visit)
and ``PackageHistoryBatch`` (patients given by codes to the ``Recommender``).
"""

from datamodules.package_graph.collate import HistoryCollator, PairCollator, PatientCollator
from datamodules.package_graph.datamodule import PackageGraphDataModule
from datamodules.package_graph.descriptions import (
    AGE_DECADES,
    GENDERS,
    VisitTable,
    document_vocabulary,
    note_vocabulary,
    visit_documents,
)
from datamodules.package_graph.graphs import (
    GraphMatrices,
    build_package_graphs,
    graph_matrices,
    package_graph,
    split_package_graphs,
)
from datamodules.package_graph.knowledge import PackageKnowledge, TrainingVisits, cooccurrence_proportions
from datamodules.package_graph.padding import pad_packages, pad_tokens

__all__ = [
    "AGE_DECADES",
    "GENDERS",
    "GraphMatrices",
    "HistoryCollator",
    "PackageGraphDataModule",
    "PackageKnowledge",
    "PairCollator",
    "PatientCollator",
    "TrainingVisits",
    "VisitTable",
    "build_package_graphs",
    "cooccurrence_proportions",
    "document_vocabulary",
    "graph_matrices",
    "note_vocabulary",
    "package_graph",
    "pad_packages",
    "pad_tokens",
    "split_package_graphs",
    "visit_documents",
]

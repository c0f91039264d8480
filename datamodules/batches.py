"""The batch layouts the collators produce, as typed dictionaries.

Annotations only: at run time a batch is the plain ``dict`` a collator returns (Lightning moves its tensors to
the device and leaves its lists on the host). Sizes: ``B`` patients, ``T`` visits of the longest patient, ``M``
drugs (the medication vocabulary), ``N`` visits listed one per row (a per-patient batch's real visits in the
row-major order of ``visit_mask.nonzero()``; a training batch's visits), ``K*`` widths of padded code or token
lists (the batch's longest list, at least 1).

Each field's docstring starts with its type and shape, ``LongTensor (B, T, Kd)`` or ``list[str] (B)``;
tests/test_batches.py checks every collator's output against it (keys, dtype, rank, and one size per name), so
the declaration cannot drift from the code.

=======================  ==================================================  =====================================
layout                   collator                                            read by
=======================  ==================================================  =====================================
``VisitBatch``           ``visit_sequence.VisitCollator``                    the sequence models (``MedRecModule``)
``PackagePairBatch``     ``package_graph.PairCollator`` (training)           DPR, NCF
``PackageEvalBatch``     ``package_graph.PatientCollator`` (evaluation)      DPR, NCF (``PackageRecModule``)
``PackageHistoryBatch``  ``package_graph.HistoryCollator`` (``Recommender``)  DPR, NCF
``NCFBatch``             ``TrainingVisits.loader`` (NCF pre-training)        ``NCFCore``
``CandidatePool``        ``TrainingVisits.pool`` (not a collator)            ``PackageRecModule.refresh_pool``
=======================  ==================================================  =====================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from torch import Tensor
    from torch_geometric.data import Batch


class PatientBatch(TypedDict):
    """One row per patient: what the shared base reads of every evaluation batch (targets, masks, ids)."""

    medications: Tensor
    """FloatTensor (B, T, M): multi-hot drug set of each visit (the target; earlier visits' sets are history)."""
    visit_mask: Tensor
    """BoolTensor (B, T): real visits (False = padding)."""
    lengths: Tensor
    """LongTensor (B): visits per patient."""
    patient_index: Tensor
    """LongTensor (B): the patient's position in its split (the bootstrap's order)."""
    patient_ids: list[str | int]
    """list[str] (B): the patients' cohort ids (a ``Recommender`` history's position where it has none)."""
    visit_ids: list[list[str | int]]
    """list[list] (B): each patient's visit ids in visit order, one per real visit (positions where none)."""


class VisitBatch(PatientBatch):
    """A patient's whole visit sequence per row, every visit at once (``datamodules.visit_sequence``)."""

    diagnoses: Tensor
    """LongTensor (B, T, Kd): diagnosis indices, 0 = padding (``diagnoses_mask`` marks the real ones)."""
    diagnoses_mask: Tensor
    """BoolTensor (B, T, Kd): real diagnosis codes."""
    procedures: Tensor
    """LongTensor (B, T, Kp): procedure indices, 0 = padding (``procedures_mask``)."""
    procedures_mask: Tensor
    """BoolTensor (B, T, Kp): real procedure codes."""
    labs: Tensor
    """LongTensor (B, T, Kl): abnormal-lab indices, 0 = padding (``labs_mask``; all False without labs)."""
    labs_mask: Tensor
    """BoolTensor (B, T, Kl): real lab codes."""
    age: Tensor
    """FloatTensor (B, T): age at the visit in years, NaN where unknown or padding."""
    los: Tensor
    """FloatTensor (B, T): length of stay in days, NaN where unknown or padding."""
    gender: Tensor
    """LongTensor (B): 0 unknown, 1 female, 2 male."""


class VisitDescriptions(TypedDict):
    """One row per visit: DPR's patient description U = {W, T} (Zheng et al., WWW 2021, §3) and its owner."""

    document: Tensor
    """LongTensor (N, Kw): disease-document tokens W (codes, age decade, gender), 0 = padding (``document_mask``)."""
    document_mask: Tensor
    """BoolTensor (N, Kw): real document tokens."""
    notes: Tensor
    """LongTensor (N, Kn): note tokens T, 0 = the unknown word or padding (``notes_mask``)."""
    notes_mask: Tensor
    """BoolTensor (N, Kn): real note tokens."""
    notes_lengths: Tensor
    """LongTensor (N): note tokens per visit (0: no note)."""
    patient_key: Tensor
    """LongTensor (N): cohort-wide patient number (candidates never come from the same patient); -1 for none."""
    package_id: Tensor
    """LongTensor (N): id of the visit's package among the training packages, -1 for none."""


class PackageVisits(VisitDescriptions):
    """Visits of the DataModule's visit table: descriptions plus the true package (``VisitTable.describe``)."""

    package: Tensor
    """LongTensor (N, Kg): the visit's true package as drug indices, -1 = padding."""
    visit_row: Tensor
    """LongTensor (N): row in the DataModule's visit table (-1: a visit given by codes)."""


class NCFBatch(VisitDescriptions):
    """Training visits for NCF's BPR over drugs (§3): descriptions and the packages as multi-hot rows."""

    package_hot: Tensor
    """FloatTensor (N, M): the visit's true package, multi-hot."""


class _NegativeGraphs(TypedDict, total=False):
    graphs: Batch
    """Batch: the package graphs of N·(1+r) packages, visit i's true package at graph i·(1+r) and its r negatives
    after it; ``graphs.owner`` (LongTensor) maps each graph to its visit. Absent with no negative packages."""


class PackagePairBatch(PackageVisits, NCFBatch, _NegativeGraphs):
    """A training batch of DPR (§5): visits, their packages and, with negatives, every package as a graph."""


class PackageEvalBatch(PatientBatch, PackageVisits):
    """An evaluation batch of DPR: the per-patient targets of ``PatientBatch`` and one description per real visit."""


class PackageHistoryBatch(VisitBatch, PackageVisits):
    """Patients given by codes (``Recommender``), for a package model: the visit-sequence layout plus each visit's
    description built from its codes."""


class CandidatePool(VisitDescriptions):
    """Every training visit, described (N = the training visits), with the distinct training packages."""

    packages: Tensor
    """LongTensor (P, Kg): the distinct training packages, -1 = padding (``package_id`` indexes them)."""
    k: int
    """int: how many similar training visits give an evaluation visit its candidates."""


LAYOUTS = (
    PatientBatch,
    VisitBatch,
    VisitDescriptions,
    PackageVisits,
    NCFBatch,
    PackagePairBatch,
    PackageEvalBatch,
    PackageHistoryBatch,
    CandidatePool,
)

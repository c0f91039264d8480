"""Every collator's output is the layout ``datamodules/batches.py`` declares: exactly its keys, and each value's
type, dtype, rank and sizes as the field's docstring gives them (one size per name, e.g. ``B``, across a batch)."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch
from conftest import handmade_datamodule
from torch_geometric.data import Batch

from datamodules import batches
from datamodules.batches import (
    LAYOUTS,
    CandidatePool,
    NCFBatch,
    PackageEvalBatch,
    PackageHistoryBatch,
    PackagePairBatch,
    VisitBatch,
)
from datamodules.package_graph import HistoryCollator, PackageGraphDataModule
from datamodules.visit_sequence import VisitSequenceDataModule

TENSOR = re.compile(r"(?P<kind>Long|Float|Bool)Tensor \((?P<shape>[^)]*)\)")
LIST = re.compile(r"list\[.*\] \((?P<size>\w+)\)")
PADDING = re.compile(r"(?P<fill>-?\d+) = padding")
DTYPES = {"Long": torch.long, "Float": torch.float32, "Bool": torch.bool}


def field_docs() -> dict[str, str]:
    """{field: its docstring} of every layout in datamodules/batches.py (a field is declared once)."""
    docs = {}
    for node in ast.parse(inspect.getsource(batches)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for field, doc in zip(node.body, node.body[1:]):
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                name = field.target.id
                assert name not in docs, f"{name} is declared twice"
                docs[name] = doc.value.value
    return docs


DOCS = field_docs()


def check_layout(batch: dict, layout: type, sizes: dict[str, int]) -> dict[str, int]:
    """Assert that ``batch`` is a ``layout``; ``sizes`` binds size names known beforehand (``M``). Returns the sizes."""
    required, optional = layout.__required_keys__, layout.__optional_keys__
    extra, missing = batch.keys() - required - optional, required - batch.keys()
    assert not extra and not missing, f"{layout.__name__}: undeclared {sorted(extra)}, absent {sorted(missing)}"
    sizes = dict(sizes)
    for key, value in batch.items():
        doc = DOCS[key]
        if tensor := TENSOR.match(doc):
            assert torch.is_tensor(value) and value.dtype == DTYPES[tensor["kind"]], (key, type(value), value.dtype)
            names = [name.strip() for name in tensor["shape"].split(",") if name.strip()]
            assert value.dim() == len(names), f"{key}: shape {tuple(value.shape)}, declared ({tensor['shape']})"
            for name, size in zip(names, value.shape):
                assert sizes.setdefault(name, size) == size, f"{key}: {name} = {size}, {sizes[name]} elsewhere"
            fill = PADDING.search(doc)
            if fill and f"{key}_mask" in batch:
                padding = value[~batch[f"{key}_mask"]]
                assert (padding == int(fill["fill"])).all(), f"{key}: padding is not {fill['fill']}"
        elif listed := LIST.match(doc):
            assert isinstance(value, list) and sizes.setdefault(listed["size"], len(value)) == len(value), key
        elif doc.startswith("Batch"):
            assert isinstance(value, Batch) and torch.is_tensor(value.owner), key
        elif doc.startswith("int"):
            assert isinstance(value, int), key
        else:  # pragma: no cover - a declaration without a type
            pytest.fail(f"{key}: the docstring does not start with its type: {doc!r}")
    return sizes


def test_every_declared_field_has_a_docstring_that_starts_with_its_type():
    for layout in LAYOUTS:
        for key in layout.__annotations__:
            doc = DOCS.get(key, "")
            assert TENSOR.match(doc) or LIST.match(doc) or doc.startswith(("Batch", "int")), (layout.__name__, key)


@pytest.fixture(scope="module")
def sequences(tiny_cohort_dir):
    dm = VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=6)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def packages(tiny_cohort_dir):
    dm = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=6, negative_packages=2)
    dm.setup("fit")
    return dm


def test_the_visit_collator_gives_a_visit_batch(sequences, tmp_path):
    batch = next(iter(sequences.train_dataloader()))
    sizes = check_layout(batch, VisitBatch, {"M": sequences.knowledge.num_medications})
    assert sizes["B"] == 6 and sizes["T"] == int(batch["lengths"].max())
    assert [len(ids) for ids in batch["visit_ids"]] == batch["lengths"].tolist()
    handmade = handmade_datamodule(tmp_path / "c")  # no labs, ages or stays: the same keys, empty or NaN
    batch = next(iter(handmade.val_dataloader()))
    check_layout(batch, VisitBatch, {"M": 4, "Kl": 1})
    assert not batch["labs_mask"].any() and batch["los"].isnan().all()


@pytest.mark.parametrize("negatives", [2, 0])
def test_the_pair_collator_gives_a_pair_batch_with_graphs_only_for_negatives(packages, negatives):
    rows = packages.train_rows()[:6].tolist()
    batch = packages.pair_collator(negatives)(rows)
    check_layout(batch, PackagePairBatch, {"M": packages.knowledge.num_medications, "N": 6})
    assert ("graphs" in batch) == (negatives > 0)
    if negatives:
        assert batch["graphs"].num_graphs == 6 * (1 + negatives)
        assert batch["graphs"].owner.tolist() == [i for i in range(6) for _ in range(1 + negatives)]


def test_the_patient_collator_gives_an_evaluation_batch_with_one_description_per_real_visit(packages):
    batch = next(iter(packages.test_dataloader()))
    sizes = check_layout(batch, PackageEvalBatch, {"M": packages.knowledge.num_medications})
    assert sizes["N"] == int(batch["visit_mask"].sum()) and sizes["B"] == 6


def test_the_history_collator_gives_a_history_batch(packages, sequences):
    samples = sequences.dataset("test").samples[:5]
    batch = HistoryCollator(packages.knowledge)(samples)
    sizes = check_layout(batch, PackageHistoryBatch, {"M": packages.knowledge.num_medications, "B": 5})
    assert sizes["N"] == int(batch["visit_mask"].sum())
    assert (batch["patient_key"] == -1).all() and (batch["visit_row"] == -1).all()


def test_ncf_pretraining_batches_and_the_candidate_pool(packages):
    visits = packages.knowledge.training_visits
    batch = next(iter(visits.loader(packages.knowledge.num_medications)))
    check_layout(batch, NCFBatch, {"M": packages.knowledge.num_medications, "N": visits.batch_size})
    pool = visits.pool()
    sizes = check_layout(pool, CandidatePool, {"N": len(visits)})
    assert sizes["P"] == len(visits.packages) and pool["k"] == visits.similar_patients


def test_a_batch_with_an_undeclared_or_a_missing_key_or_a_wrong_dtype_fails_the_check(sequences):
    batch = next(iter(sequences.val_dataloader()))
    m = {"M": sequences.knowledge.num_medications}
    with pytest.raises(AssertionError, match=r"undeclared \['extra'\]"):
        check_layout({**batch, "extra": torch.zeros(1)}, VisitBatch, m)
    with pytest.raises(AssertionError, match=r"absent \['los'\]"):
        check_layout({k: v for k, v in batch.items() if k != "los"}, VisitBatch, m)
    with pytest.raises(AssertionError, match="lengths"):
        check_layout({**batch, "lengths": batch["lengths"].float()}, VisitBatch, m)
    with pytest.raises(AssertionError, match=r"medications: M = \d+, 3 elsewhere"):
        check_layout(batch, VisitBatch, {"M": 3})

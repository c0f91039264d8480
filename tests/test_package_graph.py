"""DPR's data side: relation sources, co-occurrence, package graphs, candidates, the DataModule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Batch

from datamodules.cohort import Cohort, CohortError
from datamodules.drug_relations import merge_relations, read_relation_csv
from datamodules.package_graph import (
    PackageGraphDataModule,
    PackageKnowledge,
    cooccurrence_proportions,
    graph_matrices,
    package_graph,
    pad_packages,
    split_package_graphs,
)
from lightning_modules.layers import PackageGraphBuilder, nearest_candidates

SYN, ANT, UNK = 1, 2, -1


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


def hand_made_graph_inputs():
    """Five drugs; R and p chosen so every edge rule shows up once."""
    relation = np.zeros((5, 5), dtype=np.int64)
    relation[0, 1] = SYN  # directed: 0 -> 1 only
    relation[2, 3] = relation[3, 2] = ANT
    relation[1, 3] = UNK
    p = np.zeros((5, 5), dtype=np.float32)
    p[0, 2] = 0.5  # above the threshold
    p[2, 0] = 0.005  # below: no edge 2 -> 0
    p[3, 0] = 0.02
    p[0, 1] = 0.3  # labelled pair, its p travels with the edge
    p[4, 0] = 0.01  # exactly the threshold: "exceeds" is strict
    return relation, p


def edges_of(graph) -> dict[tuple[int, int], tuple[int, float]]:
    drugs = graph.x.tolist()
    return {
        (drugs[s], drugs[d]): (int(r), round(float(c), 6))
        for (s, d), r, c in zip(graph.edge_index.T.tolist(), graph.relation, graph.cooccurrence)
    }


def test_cooccurrence_proportions_on_a_hand_table():
    p = cooccurrence_proportions([np.array([0, 1]), np.array([0, 1, 2]), np.array([0])], 4)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[0, 1], expected[1, 0] = 2 / 3, 1.0  # num_01 = 2, num_0 = 3, num_1 = 2
    expected[0, 2], expected[2, 0] = 1 / 3, 1.0
    expected[1, 2], expected[2, 1] = 1 / 2, 1.0
    np.testing.assert_allclose(p, expected, rtol=1e-6)  # drug 3 never occurs: zero row


def test_package_graph_has_exactly_the_labelled_and_frequent_edges():
    relation, p = hand_made_graph_inputs()
    builder = PackageGraphBuilder(graph_matrices(relation, p, threshold=0.01))
    graphs = builder.build(pad_packages([np.array([0, 1, 2, 3, 4]), np.array([1, 0]), np.array([4])]))
    full, pair, single = split_package_graphs(graphs)
    assert edges_of(full) == {
        (0, 1): (SYN, 0.3),
        (2, 3): (ANT, 0.0),
        (3, 2): (ANT, 0.0),
        (1, 3): (UNK, 0.0),
        (0, 2): (0, 0.5),
        (3, 0): (0, 0.02),
    }
    assert edges_of(pair) == {(0, 1): (SYN, 0.3)}
    assert single.x.tolist() == [4] and single.edge_index.shape == (2, 0)
    # the reference one-graph construction agrees, edge order included
    reference = package_graph([0, 1, 2, 3, 4], relation, p, 0.01)
    assert torch.equal(reference.edge_index, full.edge_index) and torch.equal(reference.relation, full.relation)


def test_dpr_wg_edge_weights_follow_the_relation_signs():
    from lightning_modules.dpr import DPRWG

    relation, p = hand_made_graph_inputs()
    graphs = PackageGraphBuilder(graph_matrices(relation, p)).build(pad_packages([np.arange(5)]))
    weights = dict(zip(edges_of(split_package_graphs(graphs)[0]), DPRWG.edge_weight(_Modes("typed"), graphs).tolist()))
    assert weights == pytest.approx({(0, 1): 1.0, (2, 3): -1.0, (3, 2): -1.0, (1, 3): 0.0, (0, 2): 0.5, (3, 0): 0.02})
    no_types = DPRWG.edge_weight(_Modes("cooccurrence"), graphs)
    assert torch.equal(no_types, graphs.cooccurrence)
    assert DPRWG.edge_weight(_Modes("structure"), graphs).eq(1).all()


class _Modes:
    def __init__(self, edge_weights):
        self.hparams = type("H", (), {"edge_weights": edge_weights})()


def test_vectorised_batch_equals_from_data_list_of_single_graphs():
    rng = np.random.default_rng(0)
    relation = rng.choice([0, 0, 0, SYN, ANT, UNK], size=(30, 30))
    p = rng.random((30, 30)).astype(np.float32) * (rng.random((30, 30)) < 0.2)
    packages = [rng.choice(30, size=rng.integers(1, 12), replace=False) for _ in range(40)]
    built = PackageGraphBuilder(graph_matrices(relation, p, 0.05)).build(pad_packages(packages))
    expected = Batch.from_data_list([package_graph(pk, relation, p, 0.05) for pk in packages])
    for key in ("x", "edge_index", "relation", "cooccurrence", "batch", "ptr"):
        assert torch.equal(getattr(built, key), getattr(expected, key)), key
    assert built.num_graphs == 40 and built.num_drugs.tolist() == [len(pk) for pk in packages]
    # built from public API only (no private slice records), and split back into the same graphs
    assert all(getattr(built, name, None) is None for name in ("_slice_dict", "_inc_dict", "_num_graphs"))
    for graph, pk in zip(split_package_graphs(built), packages, strict=True):
        reference = package_graph(pk, relation, p, 0.05)
        for key in ("x", "edge_index", "relation", "cooccurrence"):
            assert torch.equal(graph[key], reference[key]), key


def test_nearest_candidates_exclude_the_patients_own_visits_and_repeat_packages():
    pool = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.7, 0.3]])
    pool_key = torch.tensor([7, 7, 8, 9, 10])  # rows 0-1: the query's own patient
    pool_package = torch.tensor([0, 1, 2, 3, 2])  # row 4 repeats row 2's package
    ids, similarity = nearest_candidates(pool[:1], torch.tensor([7]), pool, pool_key, pool_package, k=4)
    assert ids.tolist() == [[2, 3, -1, -1]]  # own rows 0 and 1 never offered; package 2 once
    assert similarity[0, 0] > similarity[0, 1] and torch.isinf(similarity[0, 2:]).all()


def test_relation_sources_merge_in_order(tmp_path):
    meds = ["A", "B", "C", "D"]
    cohort_r = np.zeros((4, 4), dtype=np.int64)
    cohort_r[0, 1] = cohort_r[1, 0] = SYN
    ddi = np.zeros((4, 4), dtype=np.float32)
    ddi[0, 1] = ddi[2, 3] = 1.0  # (A, B) is labelled synergy already: the cohort label stays
    merged = merge_relations(cohort_r, ddi)
    assert merged[0, 1] == SYN and merged[2, 3] == ANT and merged[3, 2] == ANT
    assert merge_relations(cohort_r, ddi, ddi_as_antagonism=False)[2, 3] == 0
    csv = tmp_path / "rel.csv"
    csv.write_text("drug_a,drug_b,label,direction\nC,D,none,a->b\nB,C,synergy,both\nX,A,2,both\n")
    extra = read_relation_csv(csv, meds)
    final = merge_relations(cohort_r, ddi, True, extra)
    assert final[2, 3] == 0 and final[3, 2] == ANT  # the CSV says C->D has no interaction
    assert final[1, 2] == final[2, 1] == SYN
    csv.write_text("drug_a,drug_b,label,direction\nA,B,bad,both\n")
    with pytest.raises(CohortError, match="unknown label"):
        read_relation_csv(csv, meds)
    csv.write_text("drug_a,drug_b,label,direction\nX,Y,synergy,both\n")
    with pytest.raises(CohortError, match="none of its"):
        read_relation_csv(csv, meds)


@pytest.fixture(scope="module")
def package_data(tiny_cohort_dir):
    data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=8, negative_packages=3)
    data.setup("fit")
    return data


def test_knowledge_carries_relations_cooccurrence_and_vocabularies(package_data, tiny_cohort):
    k = package_data.knowledge
    assert isinstance(k, PackageKnowledge)
    assert np.array_equal(k.relations, merge_relations(tiny_cohort.relation_matrix(), tiny_cohort.ddi_adjacency()))
    assert {SYN, ANT, UNK} <= set(np.unique(k.relations))
    train = [package_data.table.package[r] for r in package_data.train_rows()]
    np.testing.assert_allclose(k.cooccurrence, cooccurrence_proportions(train, k.num_medications))
    assert k.mean_package_size == pytest.approx(np.mean([len(p) for p in train]))
    assert "gender:F" in k.document_vocab and "age:90+" in k.document_vocab
    assert k.note_size == 0  # the synthetic cohort has no notes: text branch off
    back = PackageKnowledge.from_state(k.to_state())
    assert back.document_vocab == k.document_vocab and np.allclose(back.cooccurrence, k.cooccurrence)


def test_training_batch_pairs_every_visit_with_other_packages(package_data):
    batch = next(iter(package_data.train_dataloader()))
    n, r = len(batch["document"]), package_data.negative_packages
    graphs = batch["graphs"]
    assert graphs.num_graphs == n * (1 + r)
    assert graphs.owner.tolist() == [i for i in range(n) for _ in range(1 + r)]
    sizes = graphs.num_drugs.view(n, 1 + r)
    hot = batch["package_hot"]
    assert torch.equal(sizes[:, 0], hot.sum(1).long())  # the true package comes first
    packages = [set(g.x.tolist()) for g in split_package_graphs(graphs)]
    for i in range(n):
        own = packages[i * (1 + r)]
        assert own == set(hot[i].nonzero().flatten().tolist())
        assert all(packages[i * (1 + r) + j] != own for j in range(1, 1 + r))


def test_evaluation_batch_layout_and_candidates_without_leakage(package_data):
    batch = next(iter(package_data.val_dataloader()))
    mask = batch["visit_mask"]
    assert len(batch["document"]) == int(mask.sum())
    truth = batch["medications"][mask]
    for n, row in enumerate(batch["visit_row"].tolist()):
        assert set(truth[n].nonzero().flatten().tolist()) == set(package_data.table.package[row].tolist())
    pool = package_data.candidate_pool()
    train_keys = set(pool["patient_key"].tolist())
    assert not train_keys & set(batch["patient_key"].tolist())
    # Query the pool with its own visits, embedded so that each is most similar to itself:
    # the visit's own package (and its patient's other visits') must never be offered.
    keys, package_id = pool["patient_key"], pool["package_id"]
    embedding = torch.eye(len(keys)) + 0.01
    ids, _ = nearest_candidates(embedding, keys, embedding, keys, package_id, 10)
    unique_to_patient = 0
    for q in range(len(keys)):
        others = set(package_id[keys != keys[q]].tolist())
        offered = set(ids[q][ids[q] >= 0].tolist())
        assert len(offered) == 10 and offered <= others
        if int(package_id[q]) not in others:
            unique_to_patient += 1
            assert int(package_id[q]) not in offered
    assert unique_to_patient > len(keys) / 2  # the check above did bite


def test_notes_field_switches_the_text_branch_on(tmp_path):
    from conftest import write_cohort

    folder = write_cohort(tmp_path / "c", n_patients=12)
    cohort = Cohort.load(folder)
    cohort.visits["notes"] = [["chest", "pain"] if i % 2 else ["fever"] for i in range(len(cohort.visits))]
    cohort.save(folder)
    assert "notes" in Cohort.load(folder).fields
    data = PackageGraphDataModule(root=str(folder), batch_size=4)
    assert data.knowledge.note_vocab[0] == "<unk>" and set(data.knowledge.note_vocab[1:]) <= {"chest", "pain", "fever"}
    batch = next(iter(data.val_dataloader()))
    assert batch["notes_lengths"].gt(0).all()
    pd.testing.assert_series_equal(cohort.visits["patient_id"], Cohort.load(folder).visits["patient_id"])


def test_training_visits_travel_in_the_knowledge_and_iterate_as_the_datamodule(package_data):
    k = package_data.knowledge
    visits = k.training_visits
    rows = package_data.train_rows()
    assert len(visits) == len(rows) and visits.similar_patients == package_data.similar_patients
    pool = package_data.candidate_pool()
    table = package_data.table.describe(rows)
    for key in ("document", "document_mask", "notes_lengths", "patient_key", "package_id"):
        assert torch.equal(pool[key], table[key]), key
    assert [tuple(p[p >= 0].tolist()) for p in pool["packages"]] == [tuple(p.tolist()) for p in visits.packages]
    back = PackageKnowledge.from_state(k.to_state()).training_visits  # what a checkpoint stores
    for key, value in back.pool().items():
        assert torch.equal(value, pool[key]) if torch.is_tensor(value) else value == pool[key], key
    # NCF pre-training batches: the DataModule's training visits, its order and its batch size
    batch = next(iter(visits.loader(k.num_medications)))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(package_data.seed * 100_003))
    first = rows[order[: package_data.batch_size].numpy()]
    expected = package_data.pair_collator(0)(first.tolist())
    for key in ("document", "document_mask", "notes", "package_hot", "patient_key"):
        assert torch.equal(batch[key], expected[key]), key


def test_no_model_reads_the_datamodule():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "lightning_modules"
    offending = [
        f"{path.name}:{n}"
        for path in root.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "trainer.datamodule" in line or '"datamodule"' in line
    ]
    assert not offending, offending

"""MoleRec: shapes and causality, the masked substructure attention, the loss, the DDI weight annealing."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import batch_tensors, first_batch, fit_and_test, quiet_trainer, write_cohort

from callbacks.ddi_weight_annealing import DDIWeightAnnealing
from datamodules.cohort import CohortError
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import MoleRec, Nearest
from lightning_modules.metrics import visit_ddi_counts
from lightning_modules.molerec import SetAttentionBlock, drug_members, masked_attention

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")
SMALL = dict(embedding_dim=16, gnn_layers=2, heads=2)


@pytest.fixture()
def data(tiny_datamodule):
    tiny_datamodule.setup("fit")
    return tiny_datamodule


# --- the model -------------------------------------------------------------------------
def test_every_visit_is_predicted_causally_and_batching_changes_nothing(data):
    torch.manual_seed(0)
    model = MoleRec(knowledge=data.knowledge, **SMALL).eval()
    batch = first_batch(data)
    logits = model(batch)
    B, T = batch["visit_mask"].shape
    assert logits.shape == (B, T, data.knowledge.num_medications)
    assert (logits[~batch["visit_mask"]] == 0).all()
    b = int(torch.argmax(batch["lengths"]))
    last = int(batch["lengths"][b]) - 1
    assert last >= 1
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["diagnoses"][b, last] = (changed["diagnoses"][b, last] + 1) % data.knowledge.num_diagnoses
    changed["medications"][b, : last + 1] = 1 - changed["medications"][b, : last + 1]  # targets are not inputs
    after = model(changed)
    torch.testing.assert_close(after[b, :last], logits[b, :last])
    assert not torch.allclose(after[b, last], logits[b, last])
    for b in range(3):  # one patient at a time gives the same logits
        n = int(batch["lengths"][b])
        single = {k: v[b : b + 1, :n] if v.dim() > 1 else v[b : b + 1] for k, v in batch_tensors(batch).items()}
        torch.testing.assert_close(model(single)[0], logits[b, :n], atol=1e-5, rtol=1e-5)


def test_masked_attention_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    members, valid = drug_members(mask)
    assert members.tolist() == [[0, 1], [1, 2], [2, 0]]
    assert valid.tolist() == [[True, True], [True, True], [True, False]]
    alpha = masked_attention(queries, keys, members, valid)
    # drug 0 sees substructures 0 and 1 with scores 1/√2 and 0; drug 1 sees 1 and 2 with 2/√2 and 6/√2
    e = math.exp(1 / math.sqrt(2))
    torch.testing.assert_close(alpha[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    odds = math.exp(4 / math.sqrt(2))
    torch.testing.assert_close(alpha[1], torch.tensor([1 / (1 + odds), odds / (1 + odds)]))
    assert alpha[2].tolist() == [1.0, 0.0]  # its only substructure; the padding slot gets nothing


def test_set_attention_block_by_hand_keeps_projected_queries_in_the_residual():
    torch.manual_seed(0)
    block = SetAttentionBlock(4, heads=2)
    x = torch.randn(3, 4)
    q, k, v = block.query(x), block.key(x), block.value(x)
    heads = []
    for h in (slice(0, 2), slice(2, 4)):  # head h owns its d/heads columns
        weights = torch.softmax(q[:, h] @ k[:, h].T / math.sqrt(2), dim=-1)
        heads.append(q[:, h] + weights @ v[:, h])
    expected = block.norm2(block.output(block.norm1(torch.cat(heads, dim=1))))
    torch.testing.assert_close(block(x), expected)
    order = torch.tensor([2, 0, 1])  # a set function: permuting the substructures permutes the output
    torch.testing.assert_close(block(x[order]), block(x)[order])
    with torch.no_grad():  # the residual is W_Q X, not X: with W_Q = 0 and V = 0 every row is the same
        for layer in (block.query, block.value):
            layer.weight.zero_(), layer.bias.zero_()
    out = block(x)
    torch.testing.assert_close(out, out[:1].expand_as(out))


def test_each_drug_pools_only_its_own_substructures_scaled_by_relevancy(data):
    torch.manual_seed(0)
    model = MoleRec(knowledge=data.knowledge, **SMALL).eval()
    H = model.substructure_mask
    assert H.shape == (data.knowledge.num_medications, model.num_substructures) and (H.sum(1) >= 1).all()
    with torch.no_grad():
        alpha, substructures = model.molecular_side()
    dense = torch.zeros_like(H).scatter_add(1, model.drug_substructures, alpha)
    assert (dense[H == 0] == 0).all() and (dense[H == 1] > 0).all()
    torch.testing.assert_close(dense.sum(1), torch.ones(len(H)))
    # pooling over the members equals the dense Σ_s α_ms w_s e_s
    relevancy = torch.rand(5, model.num_substructures)
    torch.testing.assert_close(
        model.pool_substructures(alpha, relevancy, substructures),
        dense @ (relevancy.unsqueeze(-1) * substructures),
        atol=1e-5,
        rtol=1e-4,
    )
    # a drug's score moves with the relevancy of its own substructures only
    batch = first_batch(data)
    drug = int(torch.argmax(H.sum(1)))
    outside = (H[drug] == 0).nonzero().flatten()
    with torch.no_grad():
        before = model(batch)
        model.relevancy.bias[outside] += 5.0  # other drugs' substructures become more relevant
        after = model(batch)
    mask = batch["visit_mask"]
    torch.testing.assert_close(after[mask][:, drug], before[mask][:, drug])
    assert not torch.allclose(after[mask], before[mask])


def test_both_gins_run_over_all_molecules_and_are_trained(data):
    model = MoleRec(knowledge=data.knowledge, **SMALL)
    assert model.num_molecules > data.knowledge.num_medications  # several molecules per drug, one pass
    assert model.num_fragments == model.num_substructures  # every BRICS fragment has a graph
    batch = first_batch(data)
    model.compute_loss(model(batch), batch)["loss"].backward()
    for encoder in (model.molecule_encoder, model.substructure_encoder):
        assert encoder.atoms.tables[0].weight.grad.abs().sum() > 0
        assert encoder.convs[-1].nn[0].weight.grad.abs().sum() > 0
    model.eval()  # evaluation reuses the molecular side until a weight changes in place
    with torch.no_grad():
        first = model._current_molecular_side()
        assert model._current_molecular_side() is first
        model.attention_key.bias.add_(1.0)
        assert model._current_molecular_side() is not first


def test_loss_mixes_accuracy_and_ddi_per_visit(data):
    model = MoleRec(knowledge=data.knowledge, **SMALL)
    batch = first_batch(data)
    logits = model(batch)
    one, zero = model.compute_loss(logits, batch, 1.0), model.compute_loss(logits, batch, 0.0)
    torch.testing.assert_close(one["loss"], 0.95 * one["bce"] + 0.05 * one["margin"])
    torch.testing.assert_close(zero["loss"], zero["ddi"])
    p = torch.sigmoid(logits.detach())[batch["visit_mask"]]
    A = model.ddi_adj
    by_hand = [0.0005 * float(sum(A[i, j] * v[i] * v[j] for i, j in A.nonzero().tolist())) for v in p]
    assert one["ddi"].item() == pytest.approx(sum(by_hand) / len(p), rel=1e-4)
    # per-visit β: visit 0 keeps only its accuracy term, every other visit only its DDI term
    beta = torch.zeros(len(p))
    beta[0] = 1.0
    mixed = model.compute_loss(logits, batch, beta)["loss"].item()
    target = batch["medications"][batch["visit_mask"]][0]
    bce0 = torch.nn.functional.binary_cross_entropy(p[0], target).item()
    single = {k: v[:1, :1] if v.dim() > 1 else v[:1] for k, v in batch_tensors(batch).items()}
    first_visit = model.compute_loss(logits[:1, :1], single, 1.0)
    assert first_visit["bce"].item() == pytest.approx(bce0, rel=1e-4)
    assert mixed == pytest.approx((first_visit["loss"].item() + sum(by_hand[1:])) / len(p), rel=1e-4)


def test_visit_ddi_counts_by_hand():
    adj = torch.zeros(4, 4)
    adj[0, 3] = adj[3, 0] = 1.0
    probs = torch.tensor([[0.9, 0.1, 0.6, 0.7], [0.9, 0.9, 0.9, 0.9], [0.6, 0.0, 0.0, 0.6], [0.9, 0.0, 0.0, 0.0]])
    ddi, pairs = visit_ddi_counts(probs, adj)
    # sets {0,2,3}, {0,1,2,3}, {0,3}, {0}
    assert ddi.tolist() == [1, 1, 1, 0] and pairs.tolist() == [3, 6, 1, 0]


# --- the DDI weight annealing ------------------------------------------------------------
def test_annealing_law_by_hand():
    anneal = DDIWeightAnnealing(target_ddi=0.06, coef=2.5)
    beta = anneal.weights(torch.tensor([0.0, 1.0, 3.0, 0.0]), torch.tensor([10.0, 20.0, 20.0, 0.0]))
    # rates 0, 0.05 (under γ), 0.15, none -> β 1, 1, exp(2.5 (1 - 2.5)), 1
    torch.testing.assert_close(beta, torch.tensor([1.0, 1.0, math.exp(-3.75), 1.0]))
    assert anneal.ddi_rate == pytest.approx(4 / 50) and anneal.beta == pytest.approx((3 + math.exp(-3.75)) / 4)
    pooled = DDIWeightAnnealing(target_ddi=0.06, coef=2.5, granularity="batch")
    beta = pooled.weights(torch.tensor([0.0, 1.0, 3.0, 0.0]), torch.tensor([10.0, 20.0, 20.0, 0.0]))
    torch.testing.assert_close(beta, torch.full((4,), math.exp(2.5 * (1 - 0.08 / 0.06)), dtype=torch.float32))
    strict = DDIWeightAnnealing(target_ddi=0.0)
    assert strict.weights(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 3.0])).tolist() == [1.0, 0.0]
    restored = DDIWeightAnnealing(target_ddi=0.06, coef=2.5)
    restored.load_state_dict(anneal.state_dict())
    assert restored.state_dict() == anneal.state_dict() == {"beta": anneal.beta, "ddi_rate": 0.08, "steps": 1}


def test_annealing_in_a_fit_weighs_the_loss_and_logs(data):
    anneal = DDIWeightAnnealing(target_ddi=0.0, coef=2.5)
    model = MoleRec(knowledge=data.knowledge, **SMALL, lr=1e-2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[anneal])
    trainer.fit(model, datamodule=data)
    assert anneal.steps == 3 and model.ddi_controller is None  # detached after the fit
    assert trainer.callback_metrics["ddi_beta_step"].item() == pytest.approx(anneal.beta)
    assert "ddi_rate_epoch" in trainer.callback_metrics and "train_ddi_epoch" in trainer.callback_metrics


# --- refused options and data -------------------------------------------------------------
def test_bad_options_are_refused_naming_them(data):
    k = data.knowledge
    with pytest.raises(ValueError, match=r"embedding_dim \(16\) must be divisible by heads \(3\)"):
        MoleRec(knowledge=k, embedding_dim=16, heads=3)
    with pytest.raises(ValueError, match="missing_molecules must be"):
        MoleRec(knowledge=k, missing_molecules="skip")
    with pytest.raises(ValueError, match="ddi_loss_scale must be >= 0"):
        MoleRec(knowledge=k, ddi_loss_scale=-1.0)
    with pytest.raises(ValueError, match="lr_plateau_patience"):
        MoleRec(knowledge=k, lr_plateau_patience=-1)
    with pytest.raises(ValueError, match="granularity must be"):
        DDIWeightAnnealing(granularity="epoch")
    with pytest.raises(ValueError, match="coef must be > 0"):
        DDIWeightAnnealing(coef=0.0)
    with pytest.raises(ValueError, match="target_ddi must lie"):
        DDIWeightAnnealing(target_ddi=1.5)


def test_drugs_without_molecules_use_learned_vectors_or_fail(tmp_path):
    dm = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)), batch_size=4)
    assert not dm.knowledge.smiles.get("A01A")  # the handmade cohort has no molecules at all
    model = MoleRec(knowledge=dm.knowledge, embedding_dim=8, heads=2, allow_missing_molecules=True)
    assert model.drug_fallback.shape == (4, 8) and model.substructure_fallback.shape == (4, 8)
    assert model.substructure_mask.tolist() == torch.eye(4).tolist()  # one placeholder per drug
    dm.setup("fit")
    assert model(first_batch(dm)).shape[-1] == 4
    with pytest.raises(CohortError, match=r"MoleRec needs a molecule for every drug.*'A01A'"):
        MoleRec(knowledge=dm.knowledge, missing_molecules="error")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(CohortError, match="allow_missing_molecules"):
        trainer.fit(MoleRec(knowledge=dm.knowledge, embedding_dim=8), datamodule=dm)


# --- learning ----------------------------------------------------------------------------
def test_short_fit_on_synthetic_cohort_beats_nearest():
    dm = VisitSequenceDataModule(synthetic_patients=300, synthetic_seed=7, batch_size=16)
    dm.setup("fit")
    L.seed_everything(0)
    small = dict(embedding_dim=32, gnn_layers=2, dropout=0.3, gnn_dropout=0.3, lr=1e-2, normalize=True)
    fitted = fit_and_test(MoleRec(knowledge=dm.knowledge, **small), dm, epochs=15, callbacks=[DDIWeightAnnealing(0.08)])
    nearest = fit_and_test(Nearest(knowledge=dm.knowledge), dm, epochs=1)
    assert fitted["test_jaccard"] > nearest["test_jaccard"] + 0.05
    assert fitted["test_prauc"] > nearest["test_prauc"] + 0.02

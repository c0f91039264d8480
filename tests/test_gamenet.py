"""GAMENet and its annealed DDI-loss switch: shapes, causality, reference semantics, schedule, learning."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import first_batch, fit_and_test, handmade_datamodule, quiet_trainer

from callbacks import DDIAnnealing
from datamodules.cohort import Cohort
from datamodules.errors import OptionError
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import GAMENet, Nearest
from lightning_modules.ddi_loss import ddi_loss
from lightning_modules.gamenet import normalized_adjacency


@pytest.fixture()
def data(tmp_path):
    return handmade_datamodule(tmp_path / "c")


def small_model(knowledge, **kwargs):
    torch.manual_seed(0)
    return GAMENet(knowledge=knowledge, embedding_dim=8, **kwargs)


# --- model -------------------------------------------------------------------------------
def test_shapes_and_variants(data):
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    logits = model(batch)
    assert logits.shape == (*batch["visit_mask"].shape, 4)
    assert model.memory_bank().shape == (4, 8)
    plain = small_model(data.knowledge, ddi_in_memory=False)
    assert not hasattr(plain, "ddi_gcn") and not hasattr(plain, "beta")
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())
    assert plain(batch).shape == logits.shape


def test_prediction_at_t_ignores_the_future(data):
    model = small_model(data.knowledge).eval()
    batch = first_batch(data)
    b = int(torch.argmax(batch["lengths"]))  # a patient with 3 visits
    before = model(batch)
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    changed["medications"][b, 1] = 1 - changed["medications"][b, 1]  # visit 1's target
    changed["diagnoses"][b, 2] = (changed["diagnoses"][b, 2] + 1) % data.knowledge.num_diagnoses
    after = model(changed)
    torch.testing.assert_close(before[b, :2], after[b, :2])  # visits 0 and 1 unchanged
    assert not torch.allclose(before[b, 2], after[b, 2])  # visit 2 reads visit 1's drugs
    others = [i for i in range(len(batch["lengths"])) if i != b]
    torch.testing.assert_close(before[others], after[others])  # other patients untouched


def reference_logits(model: GAMENet, batch: dict, b: int) -> torch.Tensor:
    """One patient, one visit at a time, as the authors' code runs it (eval mode)."""
    n = int(batch["lengths"][b])
    bank = model.memory_bank()

    def pooled(embedding, codes, mask):
        return torch.stack([embedding(codes[t][mask[t]]).mean(0) for t in range(n)])

    h_d, _ = model.diag_rnn(pooled(model.diag_embedding, batch["diagnoses"][b], batch["diagnoses_mask"][b])[None])
    h_p, _ = model.proc_rnn(pooled(model.proc_embedding, batch["procedures"][b], batch["procedures_mask"][b])[None])
    queries = model.query(torch.cat([h_d, h_p], -1))[0]
    rows = []
    for t in range(n):
        q = queries[t : t + 1]
        fact1 = torch.softmax(q @ bank.T, -1) @ bank
        if t == 0:
            fact2 = fact1
        else:
            weights = torch.softmax(q @ queries[:t].T, -1)
            fact2 = weights @ batch["medications"][b, :t] @ bank
        rows.append(model.output(torch.cat([q, fact1, fact2], -1))[0])
    return torch.stack(rows)


def test_batched_forward_equals_visit_by_visit_reference(data):
    model = small_model(data.knowledge).eval()
    for split in ("train", "val"):
        batch = first_batch(data, split)
        together = model(batch)
        for b in range(len(batch["lengths"])):
            n = int(batch["lengths"][b])
            torch.testing.assert_close(together[b, :n], reference_logits(model, batch, b), atol=1e-5, rtol=1e-5)


def test_normalized_adjacency():
    adj = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=np.float32)
    row = normalized_adjacency(adj, "row")
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1 / 2, 1 / 2, 0], [1 / 2, 0, 1 / 2]])
    torch.testing.assert_close(row, expected)
    sym = normalized_adjacency(adj, "symmetric")
    hat = torch.as_tensor(adj) + torch.eye(3)
    d = hat.sum(1).rsqrt()
    torch.testing.assert_close(sym, d[:, None] * hat * d[None, :])
    with pytest.raises(ValueError, match="normalization"):
        normalized_adjacency(adj, "column")


def test_ddi_loss_by_hand():
    adj = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    probs = torch.tensor([[[0.5, 0.4, 0.9], [1.0, 1.0, 1.0]], [[0.2, 0.5, 0.0], [0.3, 0.3, 0.3]]])
    mask = torch.tensor([[True, True], [True, False]])
    # visits: 2·0.5·0.4 = 0.4, 2·1·1 = 2, 2·0.2·0.5 = 0.2; the padded visit does not count
    assert ddi_loss(probs, adj, mask).item() == pytest.approx((0.4 + 2.0 + 0.2) / 3)
    assert ddi_loss(probs, adj, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="ddi_adj"):
        ddi_loss(probs, torch.zeros(2, 2), mask)


def test_gamenet_ddi_loss_is_the_reference_mean_over_pairs(data):
    model = small_model(data.knowledge)
    batch = first_batch(data)
    logits = model(batch)
    losses = model.compute_loss(logits, batch)
    probs = torch.sigmoid(logits)[batch["visit_mask"]]
    expected = torch.stack([(p[:, None] * p[None, :] * model.ddi_adj).mean() for p in probs]).mean()
    torch.testing.assert_close(losses["ddi"], expected)
    torch.testing.assert_close(losses["loss"], 0.9 * losses["bce"] + 0.1 * losses["margin"])
    heavier = small_model(data.knowledge, ddi_loss_weight=30.0)
    torch.testing.assert_close(heavier.compute_loss(logits, batch)["ddi"], 30 * expected)
    with pytest.raises(ValueError, match="ddi_loss_weight"):
        small_model(data.knowledge, ddi_loss_weight=-1.0)


class FixedSwitch:
    def __init__(self, answer: bool):
        self.answer, self.seen = answer, []

    def choose(self, ddi_pairs, all_pairs):
        self.seen.append((float(ddi_pairs), float(all_pairs)))
        return self.answer


@pytest.mark.parametrize("use_ddi", [True, False])
def test_training_step_optimises_the_loss_the_switch_chooses(data, use_ddi):
    model = small_model(data.knowledge).eval()  # eval: same logits for both calls
    model.log_dict = lambda *a, **k: None
    batch = first_batch(data)
    model.ddi_switch = FixedSwitch(use_ddi)
    loss = model.training_step(batch, 0)
    losses = model.compute_loss(model(batch), batch)
    torch.testing.assert_close(loss, losses["ddi"] if use_ddi else losses["loss"])
    # the counts handed to the switch are those of the recommended sets (probability >= 0.5)
    chosen = (torch.sigmoid(model(batch)) >= 0.5) & batch["visit_mask"][..., None]
    n = chosen.sum(-1).float()
    ddi = sum(
        float(chosen[b, t, i] and chosen[b, t, j]) * float(data.knowledge.ddi_adj[i, j] > 0)
        for b, t in batch["visit_mask"].nonzero().tolist()
        for i in range(4)
        for j in range(i + 1, 4)
    )
    assert model.ddi_switch.seen == [(ddi, float((n * (n - 1) / 2).sum()))]


# --- the annealing callback -----------------------------------------------------------------
def test_switch_only_above_target_rate_with_annealing_probability():
    switch = DDIAnnealing(target_ddi=0.05, temperature=0.5, decay=0.85, seed=0)
    assert switch.probability(0.05) == 0.0 and switch.probability(0.01) == 0.0
    assert switch.probability(0.15) == pytest.approx(math.exp(-0.1 / 0.5))
    # at or below s the prediction loss is always kept
    assert not any(switch.choose(torch.tensor(5.0), torch.tensor(100.0)) for _ in range(500))
    assert not any(switch.choose(torch.tensor(0.0), torch.tensor(0.0)) for _ in range(10))
    # above s: the DDI loss with probability exp(-(rate - s)/T) = exp(-0.5) ≈ 0.61
    share = np.mean([switch.choose(torch.tensor(30.0), torch.tensor(100.0)) for _ in range(4000)])
    assert share == pytest.approx(math.exp(-0.5), abs=0.03)
    switch.temperature = 0.05  # a colder schedule takes the DDI loss far less often
    share = np.mean([switch.choose(torch.tensor(30.0), torch.tensor(100.0)) for _ in range(4000)])
    assert share == pytest.approx(math.exp(-5.0), abs=0.01)


class SummingStrategy:
    """Stands in for DDP: the reduced counts are those of all ranks together."""

    def __init__(self, totals):
        self.totals = totals

    def reduce(self, tensor, reduce_op="sum"):
        return torch.as_tensor(self.totals, dtype=tensor.dtype)


def test_ranks_take_the_same_decision():
    ranks = [DDIAnnealing(temperature=0.2, seed=3) for _ in range(2)]
    local = [(torch.tensor(1.0), torch.tensor(40.0)), (torch.tensor(19.0), torch.tensor(60.0))]
    for switch in ranks:  # global rate 20/100 = 0.2 although rank 0 alone sees 0.025 < s
        switch._strategy = SummingStrategy([20.0, 100.0])
    decisions = [[switch.choose(*local[r]) for _ in range(200)] for r, switch in enumerate(ranks)]
    assert decisions[0] == decisions[1]
    assert 0.3 < np.mean(decisions[0]) < 0.65  # exp(-0.15 / 0.2) ≈ 0.47


def test_state_round_trip_continues_the_same_draws():
    switch = DDIAnnealing(temperature=0.3, seed=1)
    for _ in range(7):
        switch.choose(torch.tensor(10.0), torch.tensor(50.0))
    switch.temperature, switch.epochs_annealed = 0.1234, 4
    state = switch.state_dict()
    resumed = DDIAnnealing(seed=99)
    resumed.load_state_dict(state)
    assert resumed.temperature == 0.1234 and resumed.epochs_annealed == 4
    expected = [switch.choose(torch.tensor(10.0), torch.tensor(50.0)) for _ in range(50)]
    assert [resumed.choose(torch.tensor(10.0), torch.tensor(50.0)) for _ in range(50)] == expected
    with pytest.raises(ValueError, match="decay"):
        DDIAnnealing(decay=1.5)


def test_temperature_decays_each_epoch_and_is_checkpointed(data, tmp_path):
    switch = DDIAnnealing(target_ddi=0.0, temperature=0.5, decay=0.5, seed=0)
    model = small_model(data.knowledge, lr=1e-2)
    trainer = L.Trainer(
        max_epochs=3,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[switch],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    logged = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    assert logged["ddi_temperature"].dropna().tolist() == [0.5, 0.25, 0.125]
    assert model.ddi_switch is None  # released after the fit
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("DDIAnnealing"))
    assert state["temperature"] == 0.125 and state["epochs_annealed"] == 2
    # resuming for a 4th epoch applies exactly one more decay
    resumed = DDIAnnealing(target_ddi=0.0, temperature=0.5, decay=0.5, seed=0)
    trainer = quiet_trainer(max_epochs=4, callbacks=[resumed])
    trainer.fit(small_model(data.knowledge, lr=1e-2), datamodule=data, ckpt_path=path)
    assert resumed.temperature == 0.0625 and resumed.epochs_annealed == 3


def test_callback_refuses_a_module_without_a_switch(data):
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[DDIAnnealing()], enable_progress_bar=False)
    with pytest.raises(OptionError, match="--ddi_controller DDIAnnealing steers a module with a `ddi_switch`"):
        trainer.fit(Nearest(knowledge=data.knowledge), datamodule=data)


# --- data -------------------------------------------------------------------------------------
def test_ehr_graph_holds_no_test_split_co_prescription(tmp_path):
    rows = []
    for p in range(9):  # safedrug split: P0-P5 train, P6 test, P7-P8 validation
        for t in range(2):
            meds = [0, 1] if p == 6 else [2, 3] if p == 7 else [0, 2] if t else [1, 3]
            rows.append(
                {"patient_id": f"P{p}", "visit_id": f"P{p}-{t}", "visit_order": t, "diagnoses": [p % 2],
                 "procedures": [0], "medications": meds}
            )  # fmt: skip
    folder = Cohort(
        visits=pd.DataFrame(rows),
        vocab={"diagnosis": ["a", "b"], "procedure": ["x"], "medication": ["A", "B", "C", "D"]},
        ddi_pairs=[("A", "B")],
    ).save(tmp_path / "c")
    dm = VisitSequenceDataModule(root=str(folder))
    assert dm.splits["test"] == ["P6"]
    expected = np.zeros((4, 4), np.float32)
    for a, b in [(0, 2), (1, 3)]:  # training co-prescriptions only
        expected[a, b] = expected[b, a] = 1
    np.testing.assert_array_equal(dm.knowledge.ehr_adj, expected)
    model = GAMENet(knowledge=dm.knowledge, embedding_dim=4)
    graph = model.ehr_gcn.adjacency
    assert graph[0, 1] == 0 and graph[2, 3] == 0  # test (A, B) and validation (C, D) pairs absent
    assert graph[0, 2] > 0 and graph[1, 3] > 0
    assert model.ddi_gcn.adjacency[0, 1] > 0


# --- learning -------------------------------------------------------------------------------
def test_short_fit_on_synthetic_cohort_beats_nearest():
    dm = VisitSequenceDataModule(synthetic_patients=400, synthetic_seed=5, batch_size=16)

    nearest = fit_and_test(Nearest(knowledge=dm.knowledge), dm, 1)
    L.seed_everything(0)
    gamenet = fit_and_test(GAMENet(knowledge=dm.knowledge, lr=5e-3), dm, 8)
    assert gamenet["test_jaccard"] > nearest["test_jaccard"] + 0.04
    assert gamenet["test_prauc"] > nearest["test_prauc"] + 0.03

"""RAREMed: visit-level encoding, the pre-training stage, the rarity grouping, learning, refused options."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import batch_tensors, fit_and_test, quiet_trainer
from lightning.pytorch.callbacks import EarlyStopping

from datamodules.errors import OptionError
from datamodules.visit_sequence import VisitCollator, VisitSequenceDataModule
from lightning_modules import DrugFrequency, RAREMed
from lightning_modules.fast_dropout import UniformDropout
from lightning_modules.raremed import BUCKET_VISITS, packed, rarity_groups, visit_rarity

SMALL = dict(embedding_dim=32, heads=2, layers=1, feedforward_dim=64, dropout=0.0)


@pytest.fixture(scope="module")
def data(tiny_cohort_dir):
    dm = VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=16)
    dm.setup("fit")
    return dm


def batch_of(dm, n=6, split="train"):
    return VisitCollator(dm.knowledge.num_medications)(dm.dataset(split).samples[:n])


# --- shapes and the visit-level encoder ------------------------------------------------------
def test_logits_cover_every_visit_and_each_visit_is_encoded_on_its_own(data):
    torch.manual_seed(0)
    model = RAREMed(knowledge=data.knowledge, **SMALL).eval()
    batch = batch_of(data)
    logits = model(batch)
    b, t = batch["visit_mask"].shape
    assert logits.shape == (b, t, data.knowledge.num_medications)
    assert torch.all(logits[~batch["visit_mask"]] == 0)
    # a visit depends on its own codes only: changing another visit's diagnoses leaves it unchanged
    row = int(torch.nonzero(batch["lengths"] >= 2)[0])
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["diagnoses"][row, 1] = (changed["diagnoses"][row, 1] + 1) % data.knowledge.num_diagnoses
    again = model(changed)
    torch.testing.assert_close(again[row, 0], logits[row, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(again[row, 1], logits[row, 1])
    # [CLS] of an explicitly built single visit equals the batched one (padding does not leak in)
    d_mask, p_mask = batch["diagnoses_mask"][row, 0], batch["procedures_mask"][row, 0]
    alone = model.output(
        model.encode(
            batch["diagnoses"][row, 0][d_mask][None],
            d_mask[d_mask][None],
            batch["procedures"][row, 0][p_mask][None],
            p_mask[p_mask][None],
        )
    )
    torch.testing.assert_close(alone[0], logits[row, 0], rtol=1e-4, atol=1e-5)


def test_packing_moves_real_tokens_to_the_front_in_order_and_drops_unused_columns():
    tokens = torch.arange(12.0).view(2, 6, 1)
    padding = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    out, pad = packed(tokens, padding)
    assert out.shape == (2, 3, 1)  # both rows have 3 real tokens: [CLS] d [SEP] p… was 6 wide
    assert out[..., 0].tolist() == [[0.0, 3.0, 4.0], [6.0, 7.0, 9.0]]
    assert not pad.any()
    out, pad = packed(tokens[:, :4], padding[:, :4])  # rows of 2 and 3 real tokens
    assert out[0, :2, 0].tolist() == [0.0, 3.0] and pad.tolist() == [[False, False, True], [False, False, False]]


def test_length_buckets_give_every_visit_its_own_encoding(data):
    torch.manual_seed(0)
    model = RAREMed(knowledge=data.knowledge, **SMALL).eval()
    visits = model.real_visits(batch_of(data, n=40))
    n = visits["diagnoses"].shape[0]
    assert n > 2 * BUCKET_VISITS  # several buckets, the last one partial
    lengths = visits["diagnoses_mask"].sum(1) + visits["procedures_mask"].sum(1)
    assert lengths.unique().numel() > 3
    with torch.no_grad():
        encoded = model.encode(**visits)
        for i in (0, int(lengths.argmax()), int(lengths.argmin()), n - 1):
            d, p = visits["diagnoses_mask"][i], visits["procedures_mask"][i]
            alone = model.encode(
                visits["diagnoses"][i][d][None], d[d][None], visits["procedures"][i][p][None], p[p][None]
            )
            torch.testing.assert_close(alone[0], encoded[i], rtol=1e-4, atol=1e-5)


def test_uniform_dropout_keeps_the_law_of_dropout():
    torch.manual_seed(0)
    drop = UniformDropout(0.3)
    x = torch.ones(200_000)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.005
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert abs(float(y.mean()) - 1.0) < 0.01  # the expectation is kept
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(UniformDropout(0.0)(x), x) and not UniformDropout(1.0)(x).any()


# --- pre-training stage ----------------------------------------------------------------------
def test_pretraining_stage_trains_the_encoder_and_heads_but_not_the_drug_layer(data):
    L.seed_everything(0)
    model = RAREMed(knowledge=data.knowledge, pretrain_epochs=1, lr=1e-2, **SMALL)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    after = model.state_dict()
    for name in ("encoder.layers.0.linear1.weight", "diagnosis_embedding.weight", "smp_head.weight", "sr_head.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not move in pre-training"
    for name in ("output.weight", "output.bias"):
        assert torch.equal(before[name], after[name]), f"{name} moved during pre-training"
    logged = trainer.callback_metrics
    assert {"train_pretrain_smp_epoch", "train_pretrain_sr_epoch"} <= logged.keys()
    assert "train_bce_epoch" not in logged  # no fine-tuning step yet
    # the second epoch fine-tunes: the drug layer moves and the recommendation loss is logged
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert not torch.equal(before["output.weight"], model.state_dict()["output.weight"])
    assert "train_bce_epoch" in trainer.callback_metrics


def test_pretraining_losses_fall_and_negatives_are_other_visits(data):
    L.seed_everything(1)
    model = RAREMed(knowledge=data.knowledge, pretrain_epochs=5, lr=1e-2, **SMALL)
    batch = batch_of(data, n=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.pretrain_losses(batch)
    for _ in range(100):  # SMP needs ~80 steps to memorise which parts belong together
        loss = model.pretrain_losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = model.pretrain_losses(batch)
    assert last["sr"] < 0.5 * first["sr"]
    assert last["smp"] < 0.7 * first["smp"]
    # SMP from the trained model: matched pairs score above mismatched ones on this batch
    v = model.real_visits(batch)
    n = v["diagnoses"].shape[0]
    shift = (torch.arange(n) + 1) % n
    model.eval()
    pos = model.smp_head(model.encode(**v)).mean()
    neg = model.smp_head(
        model.encode(v["diagnoses"], v["diagnoses_mask"], v["procedures"][shift], v["procedures_mask"][shift])
    ).mean()
    assert pos > neg


# --- rarity grouping -------------------------------------------------------------------------
def test_rarity_is_the_rarest_diagnosis_and_groups_cut_sorted_visits_evenly():
    counts = torch.tensor([10, 2, 5, 0, 1])  # code 3 never seen in training
    diagnoses = torch.tensor([[0, 2, 0], [0, 1, 0], [4, 0, 0], [3, 0, 0], [0, 0, 0], [2, 0, 0], [0, 2, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    rarity = visit_rarity(diagnoses, mask, counts)
    expected = [1 / 5, 1 / 2, 1.0, math.inf, 0.0, 1 / 5, 1 / 2]
    assert rarity.tolist() == pytest.approx(expected)
    # sorted: v4 (0), v0 & v5 (1/5), v1 & v6 (1/2), v2 (1), v3 (inf); 7 // 3 + 1 = 3 per group
    assert rarity_groups(rarity, groups=3).tolist() == [0, 1, 1, 2, 0, 0, 1]
    # 2 groups of 4 and 3: the tie v1/v6 straddles the cut; position decides, or `order` when given
    assert rarity_groups(rarity, groups=2).tolist() == [0, 0, 1, 1, 0, 0, 1]
    order = torch.tensor([0, 6, 2, 3, 4, 5, 1])  # v6 before v1
    assert rarity_groups(rarity, groups=2, order=order).tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert rarity_groups(rarity, groups=1).tolist() == [0] * 7


def test_test_metrics_report_jaccard_per_rarity_group(data):
    L.seed_everything(0)
    model = RAREMed(knowledge=data.knowledge, rarity_groups=4, lr=5e-3, **SMALL)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    shares = model.diagnosis_prevalence  # from the knowledge: share of training visits per code
    train_visits = sum(len(s["diagnoses"]) for s in data.dataset("train").samples)
    counts = torch.zeros_like(shares)
    for sample in data.dataset("train").samples:
        for codes in sample["diagnoses"]:
            counts[torch.as_tensor(codes).unique()] += 1
    assert torch.allclose(shares, counts / train_visits) and counts.sum() > train_visits  # several per visit
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    test_visits = sum(len(s["diagnoses"]) for s in data.dataset("test").samples)
    sizes = [result[f"test_rarity_group{g}_visits"] for g in range(1, 5)]
    assert sum(sizes) == test_visits and sizes[0] == test_visits // 4 + 1
    assert all(0.0 <= result[f"test_rarity_group{g}_jaccard"] <= 1.0 for g in range(1, 5))


# --- learning --------------------------------------------------------------------------------
def test_learns_the_synthetic_signal():
    # the tiny cohort is too small for a Transformer from scratch: 400 patients, as few as learn it
    dm = VisitSequenceDataModule(synthetic_patients=400, synthetic_seed=7, batch_size=16)
    dm.setup("fit")
    floor = fit_and_test(DrugFrequency(knowledge=dm.knowledge), dm, epochs=1)
    torch.manual_seed(0)
    model = RAREMed(knowledge=dm.knowledge, pretrain_epochs=1, lr=5e-3, **{**SMALL, "embedding_dim": 64})
    result = fit_and_test(model, dm, epochs=12)
    assert result["test_jaccard"] > floor["test_jaccard"] + 0.1
    assert result["test_prauc"] > floor["test_prauc"] + 0.1


# --- refused options -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, word",
    [
        (dict(embedding_dim=30, heads=4), "heads"),
        (dict(pretrain_tasks=["smp", "mlm"]), "pretrain_tasks"),
        (dict(pretrain_tasks=[]), "pretrain_tasks"),
        (dict(mask_probability=0.2), "mask_probability"),
        (dict(pretrain_epochs=2, pretrain_tasks=["smp"], mask_probability=0.2), "mask_probability"),
        (dict(mask_probability=1.0, pretrain_epochs=1), "mask_probability"),
        (dict(ddi_weight=-1.0), "ddi_weight"),
        (dict(pretrain_epochs=-1), "pretrain_epochs"),
    ],
)
def test_bad_options_are_refused_by_name(data, options, word):
    with pytest.raises(OptionError, match=word):
        RAREMed(knowledge=data.knowledge, **options)


def test_pretraining_longer_than_early_stopping_patience_is_refused(data):
    model = RAREMed(knowledge=data.knowledge, pretrain_epochs=3, **SMALL)
    trainer = quiet_trainer(max_epochs=4, callbacks=[EarlyStopping(monitor="val_jaccard", mode="max", patience=3)])
    with pytest.raises(OptionError, match="pretrain_epochs"):
        trainer.fit(model, datamodule=data)

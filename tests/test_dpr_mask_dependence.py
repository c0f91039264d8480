"""benchmarks/dpr_mask_dependence.py: a trained DPR model's mask swapped out at inference."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import dpr_mask_dependence as probe  # noqa: E402
from datamodules.package_graph import PackageGraphDataModule  # noqa: E402
from lightning_modules.dpr import DPRAG, DPRWG  # noqa: E402

SMALL = {"embedding_dim": 16, "hidden_dim": 16, "dropout": 0.0, "pretrain_epochs": 1}


@pytest.fixture(scope="module")
def data(tiny_cohort_dir):
    data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16, negative_packages=4)
    data.setup("test")
    return data


def wg_model(data, **options) -> DPRWG:
    torch.manual_seed(0)
    model = DPRWG(knowledge=data.knowledge, **SMALL, **options).eval()
    with torch.no_grad():  # masks far from 0.5, and far from each other, so swapping them matters
        model.mask.weight.mul_(20.0)
    return model


def test_replaced_mask_gives_every_visit_the_mean_or_another_visits_mask(data):
    model = wg_model(data)
    batch = next(iter(data.test_dataloader()))
    learned = model.mask_vectors(batch)
    average = learned.mean(0)
    model.mask = probe.ReplacedMask(model.mask, "mean", average)
    torch.testing.assert_close(model.mask_vectors(batch), average.expand_as(learned), atol=1e-5, rtol=0)
    model.mask = probe.ReplacedMask(model.mask.layer, "shuffled", seed=3)
    shuffled = model.mask_vectors(batch)
    assert not torch.equal(shuffled, learned)
    # the same rows (with their repeats), in another order
    for a, b in zip(shuffled.unique(dim=0, return_counts=True), learned.unique(dim=0, return_counts=True)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mean_mask"):
        probe.ReplacedMask(model.mask.layer, "mean")
    with pytest.raises(ValueError, match="mode"):
        probe.ReplacedMask(model.mask.layer, "zero")


def test_learned_f1_is_the_test_loops_and_the_trained_mask_is_put_back(data):
    model = wg_model(data)
    trained = model.mask
    results = probe.mask_dependence(model, data)
    assert model.mask is trained
    assert set(results) == set(probe.MODES) and all(0 <= v <= 1 for v in results.values())
    assert results["mean"] != results["learned"]  # the scaled mask moves the choice
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert results["learned"] == pytest.approx(metrics["test_all_f1"], abs=1e-6)


def test_models_without_a_mask_are_refused(data):
    with pytest.raises(ValueError, match="use_mask"):
        probe.mask_dependence(DPRAG(knowledge=data.knowledge, **SMALL, use_mask=False), data)


def test_report_gives_each_run_and_the_seed_mean():
    runs = [{"learned": 0.7, "mean": 0.6, "shuffled": 0.55}, {"learned": 0.8, "mean": 0.8, "shuffled": 0.7}]
    text = probe.report({"wg": runs})
    assert "| wg | 1 | 0.7000 | 0.6000 | 0.5500 | -0.1000 |" in text
    assert "| wg | mean | 0.7500 | 0.7000 | 0.6250 | -0.0500 |" in text


@pytest.mark.parametrize("spec", ["wg", "wg=", "=x.ckpt"])
def test_cli_refuses_a_checkpoint_list_without_a_name_or_a_path(spec, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--checkpoints", spec])
    assert "NAME=CKPT" in capsys.readouterr().err

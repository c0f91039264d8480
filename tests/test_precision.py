"""Mixed precision: every config trains under bf16-mixed on the CPU, and the losses, the DDI loss
and the metrics stay float32 (autocast would run their matrix products in bfloat16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import first_batch

from lightning_modules import SafeDrug
from lightning_modules.ddi_loss import ddi_loss
from train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_trains_under_bf16_mixed(config, tiny_cohort_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / config),
            f"--data.init_args.root={tiny_cohort_dir}",
            "--trainer.fast_dev_run=true",
            "--trainer.precision=bf16-mixed",
        ]
    )


def test_ddi_loss_is_float32_under_autocast():
    torch.manual_seed(0)
    probs = torch.rand(4, 3, 131)
    adj = (torch.rand(131, 131) < 0.05).float()
    mask = torch.ones(4, 3, dtype=torch.bool)
    exact = ddi_loss(probs, adj, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ddi_loss(probs, adj, mask)
        naive = ((probs[mask] @ adj) * probs[mask]).sum(-1).mean()  # what autocast alone would give
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact)
    assert abs(float(naive) - float(exact)) > 1e-4  # the comparison can tell the difference


def test_safedrug_losses_and_probabilities_are_float32_under_autocast(tiny_datamodule):
    tiny_datamodule.setup("fit")
    model = SafeDrug(knowledge=tiny_datamodule.knowledge, embedding_dim=16)
    batch = first_batch(tiny_datamodule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch)
        losses = model.compute_loss(logits, batch, beta=0.5)
        probs = model.predict_probabilities(batch)
    assert logits.dtype == torch.bfloat16  # the model itself ran in mixed precision
    assert probs.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values()), {k: v.dtype for k, v in losses.items()}

"""Evaluation under DDP (2 CPU processes, gloo) gives exactly the single-process figures."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import LogisticRegression


@pytest.mark.slow
def test_two_process_test_metrics_equal_one_process(tiny_cohort_dir, tmp_path):
    data = VisitSequenceDataModule(root=str(tiny_cohort_dir), eval_batch_size=4)
    torch.manual_seed(0)
    model = LogisticRegression(knowledge=data.knowledge)
    path = tmp_path / "init.ckpt"
    L.Trainer(logger=False, enable_progress_bar=False, max_epochs=0).strategy.connect(model)
    torch.save(model.state_dict(), path)

    def test_with(devices: int, strategy: str) -> dict:
        model.load_state_dict(torch.load(path))
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.test(model, datamodule=data, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    single = test_with(1, "auto")
    double = test_with(2, "ddp_spawn")
    # 25 test patients split 13/12: no patient may be counted twice
    assert single["test_patients"] == double["test_patients"] == 25
    for key in ("test_all_jaccard", "test_all_prauc", "test_all_ddi_rate", "test_all_avg_drugs", "test_jaccard"):
        assert double[key] == pytest.approx(single[key], abs=1e-6), key

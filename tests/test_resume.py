"""--ckpt_path last continues exactly: same weights and metrics as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import torch

from train import main

ROOT = Path(__file__).resolve().parents[1]


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_cohort_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(ROOT / "configs" / "retain.yaml"),
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.embedding_dim=16",
        "--model.init_args.hidden_dim=16",
        "--model.init_args.dropout=0.3",  # dropout: RNG state must resume too
    ]
    main(["fit", *common, "--trainer.max_epochs=3", "--checkpoint.dirpath=full"])
    main(["fit", *common, "--trainer.max_epochs=1", "--checkpoint.dirpath=part"])
    main(["fit", *common, "--trainer.max_epochs=3", "--checkpoint.dirpath=part", "--ckpt_path=part/last.ckpt"])

    full = torch.load("full/last.ckpt", weights_only=False)
    resumed = torch.load("part/last.ckpt", weights_only=False)
    assert full["epoch"] == resumed["epoch"] == 2
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)
    full_opt, resumed_opt = full["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    torch.testing.assert_close(resumed_opt[0]["exp_avg"], full_opt[0]["exp_avg"])
    best = [c for k, c in full["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    best_resumed = [c for k, c in resumed["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert float(best["best_model_score"]) == float(best_resumed["best_model_score"])

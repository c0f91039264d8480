"""--ckpt_path last continues exactly: same weights and metrics as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
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


CONTROLLED = {
    # config: (its controller's checkpoint key prefix, the state a resumed fit must continue)
    "safedrug.yaml": ("PIDDDIController", ("beta", "ddi_rate", "error", "integral", "steps")),
    "gamenet.yaml": ("DDIAnnealing", ("temperature", "epochs_annealed", "generator", "steps", "ddi_steps")),
}


@pytest.mark.parametrize("config", sorted(CONTROLLED))
def test_resume_by_last_continues_the_ddi_controller(config, tiny_cohort_dir, tmp_path, monkeypatch):
    """``--ckpt_path last`` restores the run's ddi_controller (β and its PID state; T, the decays
    applied and the switch's generator) along with the weights: the resumed run equals the
    uninterrupted one, controller state included."""
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(ROOT / "configs" / config),
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.embedding_dim=8",
        "--ddi_controller.init_args.target_ddi=0.0",  # below the predicted rate: the controller acts every step
    ]
    main(["fit", *common, "--trainer.max_epochs=2", "--checkpoint.dirpath=full"])
    main(["fit", *common, "--trainer.max_epochs=1", "--checkpoint.dirpath=part"])
    main(["fit", *common, "--trainer.max_epochs=2", "--checkpoint.dirpath=part", "--ckpt_path=last"])

    full = torch.load("full/last.ckpt", weights_only=False)
    resumed = torch.load("part/last.ckpt", weights_only=False)
    prefix, keys = CONTROLLED[config]
    (state,) = [v for k, v in full["callbacks"].items() if k.startswith(prefix)]
    (state_resumed,) = [v for k, v in resumed["callbacks"].items() if k.startswith(prefix)]
    assert sorted(state) == sorted(keys)
    for key in keys:
        assert torch.equal(torch.as_tensor(state_resumed[key]), torch.as_tensor(state[key])), key
    if prefix == "PIDDDIController":
        assert state["steps"] > 0 and state["integral"] > 0  # it saw DDI above target: β moved
    else:
        assert state["epochs_annealed"] == 1 and state["temperature"] == pytest.approx(0.5 * 0.85)
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)


def test_last_checkpoint_is_the_latest_epoch_even_without_a_better_score(tiny_cohort_dir, tmp_path, monkeypatch):
    """Lightning writes last.ckpt only with a new best; medrec's checkpoint writes it every epoch,
    so `--ckpt_path last` never resumes from a stale epoch, and `best` still finds the best one."""
    from lightning_modules.checkpoints import RunLayout, resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    frozen = [
        "--config",
        str(ROOT / "configs" / "retain.yaml"),
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.embedding_dim=8",
        "--model.init_args.hidden_dim=8",
        "--model.init_args.lr=1e-30",  # the weights never change: no epoch beats the first
        "--trainer.max_epochs=3",
        "--checkpoint.dirpath=run",
    ]
    main(["fit", *frozen])
    assert [p.name[:7] for p in (tmp_path / "run").glob("best-*.ckpt")] == ["best-0-"]
    assert torch.load("run/last.ckpt", weights_only=False)["epoch"] == 2
    best = resolve_checkpoint("best", RunLayout(dirpath=tmp_path / "run")).path
    assert best.name.startswith("best-0-") and torch.load(best, weights_only=False)["epoch"] == 0

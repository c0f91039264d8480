"""W&B sweep files are runnable as written; the W&B logger works offline/disabled."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

from train import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def sweep_config_files(sweep: dict) -> list[str]:
    command = sweep["command"]
    return [command[i + 1] for i, word in enumerate(command) if word == "--config"]


def sample(spec: dict, rng: random.Random):
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    low, high = spec["min"], spec["max"]
    distribution = spec.get("distribution", "uniform")
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution in ("int_uniform", "q_uniform") or isinstance(low, int) and isinstance(high, int):
        return rng.randint(int(low), int(high))
    return rng.uniform(low, high)


TUNABLE_METHODS = {"lr", "retain", "safedrug", "gamenet", "miranda", "ncf", "dpr_wg", "dpr_ag"}


def test_every_method_config_has_a_sweep():
    present = {p.stem for p in (ROOT / "configs").glob("*.yaml")} & TUNABLE_METHODS
    assert present <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_well_formed(path):
    sweep = load_sweep(path)
    assert sweep["program"] == "train.py"
    assert sweep["metric"]["name"].startswith("val_")
    command = sweep["command"]
    assert command[:4] == ["${env}", "python", "${program}", "fit"] and command[-1] == "${args}"
    configs = sweep_config_files(sweep)
    assert configs[0] == f"configs/{path.stem}.yaml" or (ROOT / configs[0]).is_file()
    assert all((ROOT / c).is_file() for c in configs), configs
    assert sweep["parameters"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_parameter_is_a_valid_override(path, capsys):
    """Each parameter, with a sampled value, passes the CLI parser of its config (no typo survives)."""
    sweep = load_sweep(path)
    rng = random.Random(0)
    args = []
    for name, spec in sweep["parameters"].items():
        args.append(f"--{name}={sample(spec, rng)}")
    configs = [a for c in sweep_config_files(sweep) if "logger" not in c for a in ("--config", str(ROOT / c))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    for name in sweep["parameters"]:
        assert name.split(".")[-1] + ":" in printed


@pytest.mark.parametrize("path", SWEEPS[:1], ids=lambda p: p.stem)
def test_one_sampled_parameter_set_runs(path, tiny_cohort_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = load_sweep(path)
    rng = random.Random(1)
    args = [f"--{name}={sample(spec, rng)}" for name, spec in sweep["parameters"].items()]
    configs = [a for c in sweep_config_files(sweep) for a in ("--config", str(ROOT / c))]
    main(["fit", *configs, *args, f"--data.init_args.root={tiny_cohort_dir}", "--trainer.fast_dev_run=true"])


def test_wandb_logger_goes_offline_without_a_key(tiny_cohort_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "lr.yaml"),
            "--config",
            str(ROOT / "configs" / "logger" / "wandb.yaml"),
            f"--data.init_args.root={tiny_cohort_dir}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger.init_args.save_dir=wb",
        ]
    )
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.rglob("*"))[:20]
    monkeypatch.delenv("WANDB_MODE")

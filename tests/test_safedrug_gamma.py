"""benchmarks/safedrug_gamma.py sets γ with the controller's option on the config as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from callbacks import PIDDDIController
from train import make_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import grid, safedrug_gamma  # noqa: E402
from benchmarks import run as benchmark_run  # noqa: E402


def test_every_gamma_runs_the_config_with_the_controller_option(tiny_cohort_dir, tmp_path, monkeypatch):
    started = []

    def run(cmd, **kwargs):
        started.append(cmd)
        Path(cmd[cmd.index("--out") + 1], "results.json").write_text("{}")  # as run.py would, figures aside
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(grid.subprocess, "run", run)
    opts, overrides = safedrug_gamma.parse_args(
        ["--out", str(tmp_path), "--data", str(tiny_cohort_dir), "--gammas", "0.02", "0.2", "--epochs", "1",
         "--model.init_args.embedding_dim=8", "--ddi_controller.init_args.target_ddi=0.5"]
    )  # fmt: skip
    safedrug_gamma.train(opts, overrides)
    assert len(started) == 2 and not list(tmp_path.rglob("*.yaml"))  # no rewritten config
    for gamma, cmd in zip((0.02, 0.2), started):
        assert cmd[1].endswith("benchmarks/run.py") and cmd[cmd.index("--config") + 1] == opts.config
        assert cmd[-1] == f"--ddi_controller.init_args.target_ddi={gamma:g}"  # after the user's override
        # what benchmarks/run.py builds from that command reaches the run's one controller
        run_opts, run_overrides = benchmark_run.parse_args(cmd[2:])
        cli = make_cli(benchmark_run.cli_arguments(run_opts, run_overrides), run=False)
        (pid,) = [c for c in cli.trainer.callbacks if isinstance(c, PIDDDIController)]
        assert pid.target_ddi == gamma and cli.model.hparams.embedding_dim == 8


def test_a_config_without_the_pid_controller_is_refused(tmp_path):
    opts, overrides = safedrug_gamma.parse_args(
        ["--out", str(tmp_path), "--config", str(ROOT / "configs/gamenet.yaml")]
    )
    with pytest.raises(SystemExit, match="its ddi_controller must be callbacks.PIDDDIController to set γ"):
        safedrug_gamma.train(opts, overrides)

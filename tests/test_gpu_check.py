"""benchmarks/gpu_check.py end to end on the CPU (``--device cpu``): every step runs and the report
has the provenance header (command, commit, config hash) and one row per configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def test_gpu_check_runs_every_step_on_the_cpu(tiny_cohort_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--out", str(tmp_path / "gc"), "--device", "cpu", "--data", str(tiny_cohort_dir)]
    argv += ["--configs", "retain.yaml", "gamenet.yaml", "--timed", "retain.yaml", "--batch-sizes", "16", "64"]
    argv += ["--epochs", "2", "--batches", "3", "--compared", "safedrug.yaml"]
    report = gpu_check.main(argv)
    saved = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    command = "python benchmarks/gpu_check.py " + " ".join(argv)
    assert saved["provenance"]["command"] == report["provenance"]["command"] == command
    assert [(r["config"], r["precision"]) for r in saved["fit_test"]] == [
        ("retain.yaml", "32-true"),
        ("retain.yaml", "bf16-mixed"),
        ("gamenet.yaml", "32-true"),
        ("gamenet.yaml", "bf16-mixed"),
    ]
    rows = saved["fit_test"] + saved["epoch_seconds"] + saved["cpu_vs_device"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(0 < r["test_jaccard"] < 1 for r in saved["fit_test"])
    assert [r["batch_size"] for r in saved["epoch_seconds"]] == [16, 64]
    assert all(r["epoch_seconds"] > 0 for r in saved["epoch_seconds"])
    assert saved["cpu_vs_device"][0]["max_abs_diff"] == 0.0  # the same device twice here
    text = (tmp_path / "gc" / "gpu_check.md").read_text()
    assert text.startswith(f"Command: `{command}`  \nCommit: `")
    assert f"Config hash: `{saved['provenance']['config_hash']}`" in text


def test_gpu_check_records_the_steps_its_budget_left_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = gpu_check.main(["--out", str(tmp_path / "gc"), "--device", "cpu", "--budget", "0", "--configs", "lr.yaml"])
    rows = report["fit_test"] + report["epoch_seconds"] + report["cpu_vs_device"]
    assert len(rows) == 2 + len(gpu_check.TIMED) * len(gpu_check.BATCH_SIZES) + len(gpu_check.COMPARED)
    assert {r["status"] for r in rows} == {"skipped (--budget spent)"}


def test_gpu_check_on_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--device cuda but torch sees no CUDA device"):
        gpu_check.main(["--out", str(tmp_path / "gc"), "--device", "cuda"])

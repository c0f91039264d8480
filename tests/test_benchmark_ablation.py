"""benchmarks/ablation.py: one grid cell per row and seed, a table of validation and test figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ablation  # noqa: E402


def test_rows_are_cells_and_the_table_gives_their_means_and_changes(tiny_cohort_dir, tmp_path):
    out = tmp_path / "abl"
    argv = ["--config", str(ROOT / "configs/lr.yaml"), "--data", str(tiny_cohort_dir), "--out", str(out),
            "--epochs", "1", "--seeds", "1", "2", "--ablation", "slow lr: --model.init_args.lr=1e-5"]  # fmt: skip
    text = ablation.main(argv)
    assert (out / "ablation.md").read_text().startswith("Command: `python benchmarks/ablation.py --config")
    results = {
        (row, seed): json.loads((out / row / f"seed{seed}" / "results.json").read_text())
        for row in ("lr", "slow_lr")
        for seed in (1, 2)
    }
    assert "--model.init_args.lr=1e-5" in results["slow_lr", 1]["provenance"]["command"]
    row = next(line for line in text.splitlines() if line.startswith("| slow lr |")).split(" | ")
    val = sum(results["slow_lr", s]["val_jaccard"] for s in (1, 2)) / 2
    full_val = sum(results["lr", s]["val_jaccard"] for s in (1, 2)) / 2
    test = sum(results["slow_lr", s]["jaccard"] for s in (1, 2)) / 2
    full_test = sum(results["lr", s]["jaccard"] for s in (1, 2)) / 2
    assert float(row[2]) == pytest.approx(val, abs=1e-4)
    assert float(row[3]) == pytest.approx(val - full_val, abs=2e-4)
    assert float(row[4]) == pytest.approx(test, abs=1e-4)
    assert float(row[5]) == pytest.approx(test - full_test, abs=2e-4)
    assert full_test > test  # lr 1e-5 for one epoch learns next to nothing


@pytest.mark.parametrize(
    "rows", [["no name"], [": --x=1"], ["a: --x=1", "a: --y=2"], ["full: --x=1"], ["a: notanoption"]]
)
def test_malformed_rows_are_refused(rows):
    argv = ["--config", "c.yaml", "--out", "o"]
    for row in rows:
        argv += ["--ablation", row]
    with pytest.raises(SystemExit):
        ablation.parse_args(argv)

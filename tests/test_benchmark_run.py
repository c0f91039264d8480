"""benchmarks/run.py: the interface other tools call, and the figures it must write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402
from benchmarks.grid import Cell  # noqa: E402


def test_run_writes_results_json_and_table_row(tiny_cohort, tiny_cohort_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    results = bench.run(
        [
            "--config",
            str(ROOT / "configs" / "lr.yaml"),
            "--data",
            str(tiny_cohort_dir),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--seed",
            "3",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.lr=0.01",
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("jaccard", "f1", "prauc", "ddi_rate", "avg_drugs"):
        assert 0.0 <= saved[key] <= (1.0 if key != "avg_drugs" else 200.0), key
        assert saved[f"{key}_std"] >= 0.0
        assert saved[f"all_{key}"] is not None
    assert saved["epochs"] == 2 and saved["epoch_seconds"] > 0
    assert saved["infer_seconds"] > 0 and saved["peak_rss_mb"] > 50
    # LR: one weight per (diagnosis or procedure, drug) plus a bias per drug
    n_diag, n_proc, n_med = (len(tiny_cohort.vocab[k]) for k in ("diagnosis", "procedure", "medication"))
    assert saved["params"] == (n_diag + n_proc + 1) * n_med
    assert saved["test_patients"] == 25  # safedrug split of 150 patients: 150 - 100 = 50, test 25
    assert Path(saved["best_checkpoint"]).is_file()
    # the tested checkpoint's validation Jaccard, as its file name records it
    assert f"{saved['val_jaccard']:.4f}" in Path(saved["best_checkpoint"]).name
    # the provenance: the command as typed, and the config hash a grid cell of this run compares
    overrides = ("--trainer.enable_progress_bar=false", "--model.init_args.lr=0.01")
    config = str(ROOT / "configs" / "lr.yaml")
    cell = Cell("lr", config, seed=3, data=str(tiny_cohort_dir), epochs=2, overrides=overrides)
    assert saved["provenance"]["config_hash"] == cell.hash
    assert saved["provenance"]["command"].startswith(f"python benchmarks/run.py --config {cell.config} --data ")
    header, table = (out / "results.md").read_text().split("\n\n", 1)
    assert header.splitlines()[2] == f"Config hash: `{cell.hash}`"
    table = table.splitlines()
    assert table[0].startswith("| method | data | Jaccard")
    assert table[2].startswith("| lr | tiny | ")
    assert list((out / "logs").rglob("metrics.csv"))

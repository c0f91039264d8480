"""benchmarks/leaderboard.py: aggregation over seeds, paired t-test, report and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import grid, leaderboard  # noqa: E402


def fake_result(jaccard: float, ddi: float) -> dict:
    return {
        "jaccard": jaccard,
        "f1": jaccard + 0.1,
        "prauc": jaccard + 0.2,
        "ddi_rate": ddi,
        "avg_drugs": 10.0,
        "epoch_seconds": 1.5,
        "infer_seconds": 0.3,
        "peak_rss_mb": 500.0,
        "params": 1234,
    }


def write_finished(out: Path, argv: list[str], values: dict[str, list[tuple[float, float]]]) -> None:
    """Results of the grid cells ``leaderboard.main(argv)`` will plan, as if run.py had written them."""
    opts = leaderboard.parse_args(argv)
    for cell in leaderboard.cells(opts.configs, opts):
        if cell.method in values:
            jac, ddi = values[cell.method][cell.seed]
            folder = out / cell.name
            folder.mkdir(parents=True)
            result = {**fake_result(jac, ddi), "provenance": {"config_hash": cell.hash}}
            (folder / "results.json").write_text(json.dumps(result))


def test_paired_t_test_matches_hand_computation():
    a, b = np.array([0.50, 0.52, 0.51]), np.array([0.48, 0.49, 0.50])
    # differences 0.02, 0.03, 0.01: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt(3)) = 3.464
    from scipy import stats

    assert grid.paired_t_test(a, b) == pytest.approx(2 * stats.t.sf(3.4641016, df=2), rel=1e-6)
    assert np.isnan(grid.paired_t_test(a, a))


def test_report_from_existing_runs(tmp_path):
    out = tmp_path / "report"
    values = {"lr": [(0.50, 0.07), (0.52, 0.08)], "retain": [(0.48, 0.08), (0.47, 0.07)]}
    gamma = tmp_path / "gamma.json"
    gamma.write_text(json.dumps([{"gamma": g, "jaccard": 0.4 + g, "ddi_rate": g + 0.005} for g in (0.02, 0.06)]))
    argv = ["--out", str(out), "--configs", "configs/lr.yaml", "configs/retain.yaml", "--seeds", "0", "1"]
    write_finished(out, argv, values)
    for method, runs in values.items():
        for seed, (jac, _) in enumerate(runs):
            logs = out / method / f"seed{seed}" / "logs" / method / "version_0"
            logs.mkdir(parents=True)
            pd.DataFrame({"epoch": [0, 1], "val_jaccard": [jac - 0.1, jac]}).to_csv(logs / "metrics.csv", index=False)
    argv += ["--gamma-report", str(gamma)]
    summary = leaderboard.main(argv)
    lr = summary.set_index("method").loc["lr"]
    # sample std (ddof 1) over the seeds: |0.50 - 0.52| / sqrt(2)
    assert lr["jaccard"] == pytest.approx(0.51) and lr["jaccard_std"] == pytest.approx(0.02 / np.sqrt(2))
    assert np.isnan(lr["p_vs_reference"])
    retain = summary.set_index("method").loc["retain"]
    assert retain["jaccard"] == pytest.approx(0.475)
    assert 0 < retain["p_vs_reference"] < 1
    report = (out / "report.md").read_text()
    assert "| lr | 0.5100 ± 0.0141 |" in report and "| retain | 0.4750 ± 0.0071 |" in report
    assert report.startswith(f"Command: `python benchmarks/leaderboard.py {' '.join(argv)}`")
    for png in ("jaccard_vs_ddi.png", "validation_curves.png", "safedrug_gamma.png"):
        assert (out / png).stat().st_size > 10_000, png


def test_default_configs_are_every_main_method_config():
    names = [Path(config).stem for config in leaderboard.default_configs()]
    assert {"frequency", "safedrug", "gamenet", "miranda", "dpr_wg", "dpr_ag"} <= set(names)
    assert not {"safedrug_l", "dpr_ag_no_type", "gamenet_noddi"} & set(names)  # variants have their own tables


def test_a_method_the_data_cannot_feed_is_skipped_and_named(tmp_path, monkeypatch, capsys):
    out = tmp_path / "board"
    argv = ["--out", str(out), "--configs", "configs/lr.yaml", "configs/miranda.yaml", "--seeds", "0", "1"]
    write_finished(out, argv, {"lr": [(0.50, 0.05), (0.52, 0.05)]})

    real_run = grid.subprocess.run

    def refuse(command, stdout=None, **kwargs):  # what train.py logs when MiranDa meets the benchmark pickles
        if stdout is None:  # not a benchmark run (the report's git look-up)
            return real_run(command, **kwargs)
        stdout.write("medrec: error: MiranDa needs visit field(s) ['los', 'age'], which the data (x) does not have\n")
        return grid.subprocess.CompletedProcess(command, 2)

    monkeypatch.setattr(grid.subprocess, "run", refuse)
    summary = leaderboard.main(argv)
    assert list(summary["method"]) == ["lr"]
    assert "skipped miranda: medrec: error: MiranDa needs visit field(s)" in capsys.readouterr().err
    assert "Skipped miranda:" in (out / "report.md").read_text()

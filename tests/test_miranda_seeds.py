"""benchmarks/miranda_seeds.py: its grid cells, the paired tests over seeds, --reuse and the report header."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import grid, miranda_seeds  # noqa: E402


@pytest.fixture
def trained(monkeypatch):
    """Replaces each cell's run.py by a stub whose ELOS depends on method and seed; records the cells run."""
    cells = []

    def run_cell(cell, out):
        cells.append(cell)
        base = {key: 0.0 for key in miranda_seeds.KEYS}
        elos = 10.0 - 0.1 * (1 + cell.seed) * (cell.method == "miranda")
        result = {**base, "elos": elos, "epochs": 1, "epoch_seconds": 1.0, "retrieval_seconds": 0.1}
        folder = Path(out) / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(grid, "run_cell", run_cell)
    # main() also sets process-wide state the rest of the test session must not inherit
    monkeypatch.setattr(miranda_seeds.RetrievalClock, "install", classmethod(lambda cls: None))
    monkeypatch.setattr(miranda_seeds.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(miranda_seeds, "batch_speed", lambda data: {})
    monkeypatch.setattr(miranda_seeds, "elos_sanity", lambda data, seed, overrides: {})
    return cells


def test_every_seed_trains_both_methods_on_its_own_split(tmp_path, trained):
    argv = ["--out", str(tmp_path), "--seeds", "0", "1", "2", "--epochs", "3", "--model.init_args.lr=0.01"]
    payload = miranda_seeds.main(argv)
    assert [(c.method, c.seed) for c in trained] == [(m, s) for s in (0, 1, 2) for m in ("baseline", "miranda")]
    cell = trained[3]  # miranda, seed 1
    assert cell.config.endswith("configs/miranda.yaml") and cell.epochs == 3 and cell.name == "miranda/seed1"
    assert "--data.init_args.seed=1" in cell.overrides and "--data.init_args.split=random" in cell.overrides
    assert cell.overrides[-1] == "--model.init_args.lr=0.01"
    assert any("benchmarks.miranda_seeds.RetrievalClock" in o for o in cell.overrides)
    # ELOS differences -0.1, -0.2, -0.3: mean -0.2, sample std 0.1, t = -0.2 / (0.1 / sqrt 3)
    test = payload["paired_tests"]["elos"]
    assert test["seeds"] == [0, 1, 2] and test["mean_difference"] == pytest.approx(-0.2)
    assert test["t"] == pytest.approx(-0.2 / (0.1 / 3**0.5))
    assert payload["summary"]["miranda"]["elos"] == pytest.approx({"mean": 9.8, "std": 0.1})
    assert payload["provenance"]["command"] == "python benchmarks/miranda_seeds.py " + " ".join(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["provenance"] == payload["provenance"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith(f"Command: `{payload['provenance']['command']}`  \nCommit: `")
    assert "| elos | -0.2000 |" in report


def test_reuse_pairs_new_miranda_runs_with_earlier_baselines(tmp_path, trained):
    miranda_seeds.main(["--out", str(tmp_path / "first"), "--seeds", "0", "1"])
    trained.clear()
    payload = miranda_seeds.main(
        ["--out", str(tmp_path / "second"), "--seeds", "0", "1", "--methods", "miranda", "--reuse"]
        + [str(tmp_path / "first"), "--model.init_args.top_k=3"]
    )
    assert [(c.method, c.seed) for c in trained] == [("miranda", 0), ("miranda", 1)]
    assert sorted((r["method"], r["seed"]) for r in payload["runs"]) == [
        ("baseline", 0),
        ("baseline", 1),
        ("miranda", 0),
        ("miranda", 1),
    ]
    assert payload["paired_tests"]["elos"]["mean_difference"] == pytest.approx(-0.15)

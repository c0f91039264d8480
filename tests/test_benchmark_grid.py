"""benchmarks/grid.py: one run.py process per cell, resumed by config hash, mean ± std over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import grid  # noqa: E402
from benchmarks.provenance import run_config_hash  # noqa: E402

# A stand-in for run.py: parses the same options, writes results.json with run.py's config hash
# and a Jaccard that depends on the seed and on an override, and logs each call; exit 3 on request.
FAKE_RUN = """
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from benchmarks.provenance import run_config_hash
p = argparse.ArgumentParser()
for name in ("--config", "--out", "--data"):
    p.add_argument(name)
p.add_argument("--epochs", type=int)
p.add_argument("--seed", type=int)
opts, overrides = p.parse_known_args()
with open({calls!r}, "a") as f:
    f.write(json.dumps([Path(opts.config).stem, opts.seed, overrides]) + "\\n")
if "--fail" in overrides:
    print("medrec: error: MiranDa needs visit field(s) ['los']")
    sys.exit(3)
bonus = 0.1 if "--bonus" in overrides else 0.0
digest = run_config_hash(opts.config, opts.data, opts.epochs, opts.seed, overrides)
results = {{"jaccard": 0.4 + 0.01 * opts.seed + bonus, "ddi_rate": 0.05, "provenance": {{"config_hash": digest}}}}
Path(opts.out, "results.json").write_text(json.dumps(results))
"""


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """grid.RUN replaced by FAKE_RUN; returns a function listing the (method, seed, overrides) run so far."""
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN.format(root=str(ROOT), calls=str(calls)))
    monkeypatch.setattr(grid, "RUN", script)
    return lambda: [tuple(json.loads(line)[:2]) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_cells_are_configs_times_seeds_with_per_seed_overrides():
    cells = grid.grid_cells(
        ["configs/lr.yaml", "configs/retain.yaml"], [0, 1], epochs=2, per_seed=lambda s: [f"--data.init_args.seed={s}"]
    )
    assert [c.name for c in cells] == ["lr/seed0", "lr/seed1", "retain/seed0", "retain/seed1"]
    assert cells[1].overrides == ("--data.init_args.seed=1",)
    assert cells[1].command(Path("o"))[2:] == ["--config", "configs/lr.yaml", "--out", "o", "--epochs", "2"] + [
        "--seed",
        "1",
        "--data.init_args.seed=1",
    ]
    # the hash is run.py's: config contents, data, epochs, seed, overrides; not the output folder
    assert cells[1].hash == run_config_hash("configs/lr.yaml", None, 2, 1, ["--data.init_args.seed=1"])
    assert len({c.hash for c in cells}) == 4
    assert grid.Cell("lr", "configs/lr.yaml", seed=1).hash != grid.Cell("lr", "configs/retain.yaml", seed=1).hash


def test_grid_resumes_by_config_hash(tmp_path, fake_run):
    out = tmp_path / "out"
    cells = grid.grid_cells(["configs/lr.yaml"], [0, 1])
    outcomes = grid.run_grid(cells, out, progress=False)
    assert fake_run() == [("lr", 0), ("lr", 1)]
    assert [r["jaccard"] for r in outcomes.values()] == pytest.approx([0.40, 0.41])

    grid.run_grid(grid.grid_cells(["configs/lr.yaml"], [0, 1, 2]), out, progress=False)
    assert fake_run()[2:] == [("lr", 2)]  # seeds 0 and 1 were finished

    # another override is another cell: its stale results.json is not reused, and the stale run's
    # checkpoints go (a rerun would otherwise write best-*-v1.ckpt beside them, and a glob finds both)
    changed = grid.grid_cells(["configs/lr.yaml"], [0], overrides=["--bonus"])
    assert grid.finished(changed[0], out) is None
    stale = out / "lr" / "seed0" / "checkpoints" / "best-3-0.4000.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_text("weights of the earlier run")
    assert grid.run_grid(changed, out, progress=False)[changed[0]]["jaccard"] == pytest.approx(0.5)
    assert fake_run()[3:] == [("lr", 0)]
    assert not stale.parent.exists()


def test_a_failed_cell_is_its_exception_and_the_others_still_run(tmp_path, fake_run):
    cells = [grid.Cell("lr", "configs/lr.yaml", seed=0), grid.Cell("bad", "configs/lr.yaml", overrides=["--fail"])]
    outcomes = grid.run_grid(cells, tmp_path, jobs=2, progress=False)
    assert outcomes[cells[0]]["jaccard"] == pytest.approx(0.4)
    error = outcomes[cells[1]]
    assert isinstance(error, grid.CellFailed) and error.returncode == 3
    assert "needs visit field(s)" in error.log.read_text()
    assert list(grid.results_frame(outcomes)["cell"]) == ["lr/seed0"]
    with pytest.raises(ValueError, match="distinct names"):
        grid.run_grid([cells[0], cells[0]], tmp_path, progress=False)


def test_aggregate_is_mean_and_sample_std_over_seeds():
    frame = pd.DataFrame(
        {
            "method": ["a", "a", "a", "b"],
            "seed": [0, 1, 2, 0],
            "jaccard": [0.50, 0.52, 0.57, 0.40],
            "ddi_rate": [0.1, None, 0.3, 0.2],
        }
    )
    summary = grid.aggregate(frame, ["jaccard", "ddi_rate"]).set_index("method")
    assert summary.loc["a", "jaccard"] == pytest.approx(0.53)
    # deviations -0.03, -0.01, 0.04: sum of squares 0.0026 over 2 degrees of freedom
    assert summary.loc["a", "jaccard_std"] == pytest.approx(np.sqrt(0.0013))
    assert summary.loc["a", "ddi_rate"] == pytest.approx(0.2) and summary.loc["a", "seeds"] == 3
    assert summary.loc["b", "jaccard_std"] == 0.0  # one seed
    paired = grid.paired_by_seed(frame.assign(method=["a", "a", "b", "b"], seed=[0, 1, 0, 1]), "jaccard", "a", "b")
    assert paired["seeds"] == [0, 1] and paired["mean_difference"] == pytest.approx((0.50 - 0.57 + 0.52 - 0.40) / 2)

"""benchmarks/dpr_step_speed.py: training-step seconds of each message-passing form on the committed configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import dpr_step_speed as speed  # noqa: E402


def test_times_every_config_in_both_forms_on_the_same_batches(tiny_cohort_dir, tmp_path):
    out = tmp_path / "speed.json"
    rows = speed.main(
        ["--data", str(tiny_cohort_dir), "--configs", "dpr_wg", "dpr_ag", "--batches", "1", "--out", str(out)]
        + ["--", "embedding_dim=16", "hidden_dim=16"]
    )
    assert [(r["config"], r["message_passing"]) for r in rows] == [
        ("dpr_wg", "edge_gru"),
        ("dpr_wg", "gated"),
        ("dpr_ag", "edge_gru"),
        ("dpr_ag", "gated"),
    ]
    assert all(r["step_seconds"] > 0 and r["edges"] > r["nodes"] > r["graphs"] > 0 for r in rows)
    assert rows[0]["edges"] == rows[1]["edges"]  # both forms timed on the same batches
    assert json.loads(out.read_text())["rows"] == rows


def test_refuses_a_config_that_is_not_dpr_and_a_malformed_override():
    with pytest.raises(ValueError, match="ncf: not a DPR config"):
        speed.config_parts("ncf")
    with pytest.raises(SystemExit, match="is not init_arg=value"):
        speed.parse_overrides(["embedding_dim"])


def test_refuses_more_batches_than_the_training_split_has(tiny_cohort_dir):
    with pytest.raises(SystemExit, match="dpr_wg: the training split has .* batches, fewer than --batches"):
        speed.main(["--data", str(tiny_cohort_dir), "--configs", "dpr_wg", "--batches", "10000"])

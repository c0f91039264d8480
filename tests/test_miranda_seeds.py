"""benchmarks/miranda_seeds.py: --resume keeps finished runs and trains only the missing ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import miranda_seeds  # noqa: E402


@pytest.fixture
def trained(monkeypatch):
    """Replaces training by a stub whose figures depend on method and seed; records what was trained."""
    calls = []

    def run_one(method, seed, opts, overrides):
        calls.append((method, seed))
        base = {key: 0.0 for key in miranda_seeds.KEYS}
        return {**base, "method": method, "seed": seed, "elos": 10.0 - 0.1 * (1 + seed) * (method == "miranda")}

    monkeypatch.setattr(miranda_seeds, "run_one", run_one)
    # main() also sets process-wide state the rest of the test session must not inherit
    monkeypatch.setattr(miranda_seeds.RetrievalClock, "install", classmethod(lambda cls: None))
    monkeypatch.setattr(miranda_seeds.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(miranda_seeds, "batch_speed", lambda data: {})
    monkeypatch.setattr(miranda_seeds, "elos_sanity", lambda data, seed, overrides: {})
    monkeypatch.setattr(miranda_seeds, "report", lambda payload: "")
    return calls


def test_resume_trains_only_missing_pairs_with_the_same_overrides(tmp_path, trained):
    out = str(tmp_path)
    miranda_seeds.main(["--out", out, "--seeds", "0", "1"])
    assert trained == [("baseline", 0), ("miranda", 0), ("baseline", 1), ("miranda", 1)]
    trained.clear()

    payload = miranda_seeds.main(["--out", out, "--seeds", "0", "1", "2", "--resume"])
    assert trained == [("baseline", 2), ("miranda", 2)]
    assert sorted((r["method"], r["seed"]) for r in payload["runs"]) == sorted(
        (m, s) for m in ("baseline", "miranda") for s in (0, 1, 2)
    )
    assert payload["paired_tests"]["elos"]["seeds"] == [0, 1, 2]
    assert payload["paired_tests"]["elos"]["mean_difference"] == pytest.approx(-0.2)
    assert len(json.loads((tmp_path / "runs.json").read_text())) == 6
    trained.clear()

    # other overrides: the earlier runs do not count
    miranda_seeds.main(["--out", out, "--seeds", "0", "--resume", "--model.init_args.lr=0.01"])
    assert trained == [("baseline", 0), ("miranda", 0)]
    trained.clear()

    # without --resume every pair is trained again
    miranda_seeds.main(["--out", out, "--seeds", "0"])
    assert trained == [("baseline", 0), ("miranda", 0)]

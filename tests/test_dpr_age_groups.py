"""benchmarks/dpr_age_groups.py: recommendations split by age, hand-computed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import dpr_age_groups  # noqa: E402
from datamodules.cohort import Cohort  # noqa: E402


def tiny_cohort() -> Cohort:
    visits = pd.DataFrame(
        {
            "patient_id": ["p1", "p1", "p2"],
            "visit_id": ["p1-0", "p1-1", "p2-0"],
            "visit_order": [0, 1, 0],
            "age": [70.0, 71.0, 30.0],
            "medications": [[0, 2], [0, 2, 3], [0, 1]],
        }
    )
    return Cohort(visits=visits, vocab={"medication": ["A", "B", "C", "D"]}, ddi_pairs=[("B", "A")])


def write(path: Path, chosen: dict[str, list[str]]) -> Path:
    path.write_text("".join(json.dumps({"visit_id": v, "drugs": d}) + "\n" for v, d in chosen.items()))
    return path


def test_age_groups_hand_computed(tmp_path):
    model = write(tmp_path / "m.jsonl", {"p1-0": ["A", "C"], "p1-1": ["A", "B"], "p2-0": ["C"]})
    base = write(tmp_path / "b.jsonl", {"p1-0": ["A"], "p1-1": ["A", "C", "D"], "p2-0": ["A", "B"]})
    summary = dpr_age_groups.summarise(tiny_cohort(), {"m": model, "base": base}, age=60, baseline="base")
    m, b = (row for _, row in summary.set_index("name").iterrows())
    # m: visit F1 1 and 2·1/(3+2) = 0.4 for the old patient, 0 for the young one
    assert m["f1"] == pytest.approx((0.7 + 0.0) / 2)
    assert (m["f1_old"], m["exact_old"], m["adverse_old"], m["adverse_recorded_old"]) == pytest.approx(
        (0.7, 0.5, 0.5, 0)
    )
    assert (m["f1_young"], m["adverse_young"], m["adverse_recorded_young"]) == (0.0, 0.0, 1.0)
    assert (m["visits_old"], m["visits_young"], m["patients"]) == (2, 1, 2)
    assert b["f1"] == pytest.approx(((2 / 3 + 1) / 2 + 1) / 2)
    assert m["f1_minus_baseline"] == pytest.approx(((0.7 - 5 / 6) + (0 - 1)) / 2)
    assert m["p_paired"] == pytest.approx(stats.ttest_rel([0.7, 0.0], [5 / 6, 1.0]).pvalue)
    assert pd.isna(b.get("f1_minus_baseline"))
    text = dpr_age_groups.markdown(summary, 60, "base")
    assert "| m | 0.3500 | 0.000 / 0.700 | 0.000 / 0.500 | 0.000 / 0.500 | 1.000 / 0.000 | -0.5667 |" in text
    assert "| base | 0.9167 |" in text and text.count("\n") == 4


def test_age_groups_refuse_mismatched_input(tmp_path):
    cohort = tiny_cohort()
    stranger = write(tmp_path / "s.jsonl", {"x-9": ["A"]})
    with pytest.raises(ValueError, match="visit 'x-9' is not in the cohort"):
        dpr_age_groups.summarise(cohort, {"s": stranger}, age=60)
    one = write(tmp_path / "one.jsonl", {"p1-0": ["A"]})
    both = write(tmp_path / "both.jsonl", {"p1-0": ["A"], "p2-0": ["A"]})
    with pytest.raises(ValueError, match="not predicted for the same patients"):
        dpr_age_groups.summarise(cohort, {"one": one, "both": both}, age=60, baseline="both")
    with pytest.raises(ValueError, match="--baseline 'gnn' is none of"):
        dpr_age_groups.summarise(cohort, {"one": one}, age=60, baseline="gnn")
    with pytest.raises(SystemExit):
        dpr_age_groups.main(["--predictions", "no-equals-sign"])


def test_age_groups_command_on_the_synthetic_cohort(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDREC_CACHE", str(tmp_path / "cache"))
    options = ["--synthetic_patients", "30", "--synthetic_options", "{regimens: 5, vulnerable_age: 60}"]
    spec = dpr_age_groups.synthetic_spec(30, 0, {"regimens": 5, "vulnerable_age": 60})
    cohort = dpr_age_groups.resolve_cohort(None, synthetic=spec, cache_dir=tmp_path / "cache")
    drugs = cohort.vocab["medication"]
    recorded = {v: [drugs[i] for i in m] for v, m in zip(cohort.visits["visit_id"], cohort.visits["medications"])}
    path = write(tmp_path / "recorded.jsonl", recorded)
    summary = dpr_age_groups.main([*options, "--predictions", f"truth={path}", "--out", str(tmp_path / "out")])
    row = summary.iloc[0]
    assert row["f1"] == 1.0 and row["exact_old"] == 1.0 and row["adverse_recorded_old"] == 0.0
    assert row["adverse_young"] == row["adverse_recorded_young"]
    assert "| truth | 1.0000 |" in (tmp_path / "out" / "age_groups.md").read_text()
    assert json.loads((tmp_path / "out" / "age_groups.json").read_text())["rows"][0]["visits"] == len(recorded)


def test_runs_of_one_model_are_averaged_per_patient_before_the_paired_test(tmp_path):
    cohort = tiny_cohort()
    seed_a = write(tmp_path / "a.jsonl", {"p1-0": ["A", "C"], "p1-1": ["A", "B"], "p2-0": ["C"]})
    seed_b = write(tmp_path / "b.jsonl", {"p1-0": ["A"], "p1-1": ["A", "C", "D"], "p2-0": ["A", "B"]})
    base = write(tmp_path / "base.jsonl", {"p1-0": ["C"], "p1-1": ["C"], "p2-0": ["B"]})
    summary = dpr_age_groups.summarise(cohort, {"m": [seed_a, seed_b], "base": base}, age=60, baseline="base")
    m = summary.set_index("name").loc["m"]
    # per patient over the two runs: p1 (0.7 + 5/6) / 2, p2 (0 + 1) / 2; base: p1 (2/3 + 1/2) / 2, p2 2/3
    p1, p2 = (0.7 + 5 / 6) / 2, 0.5
    assert m["f1"] == pytest.approx((p1 + p2) / 2)
    assert (m["visits"], m["patients"], m["visits_old"]) == (6, 2, 4)
    assert m["exact_old"] == pytest.approx(2 / 4) and m["adverse_all"] == pytest.approx(2 / 6)
    base_p1, base_p2 = (2 / 3 + 0.5) / 2, 2 / 3
    assert m["f1_minus_baseline"] == pytest.approx(((p1 - base_p1) + (p2 - base_p2)) / 2)
    assert m["p_paired"] == pytest.approx(stats.ttest_rel([p1, p2], [base_p1, base_p2]).pvalue)
    short = write(tmp_path / "short.jsonl", {"p1-0": ["A"], "p1-1": ["A"]})
    with pytest.raises(ValueError, match="do not predict the same visits"):
        dpr_age_groups.summarise(cohort, {"m": [seed_a, short]}, age=60)
    assert dpr_age_groups.named_path("m=a.jsonl,b.jsonl") == ("m", [Path("a.jsonl"), Path("b.jsonl")])
    with pytest.raises(Exception, match="NAME=PATH"):
        dpr_age_groups.named_path("m=a.jsonl,")


def test_a_cohort_without_ages_gets_overall_shares_instead_of_age_groups(tmp_path):
    cohort = tiny_cohort()
    cohort.visits = cohort.visits.drop(columns="age")
    model = write(tmp_path / "m.jsonl", {"p1-0": ["A", "C"], "p1-1": ["A", "B"], "p2-0": ["C"]})
    summary = dpr_age_groups.summarise(cohort, {"m": model}, age=60)
    row = summary.iloc[0]
    assert (row["visits_young"], row["visits_old"]) == (0, 0)
    assert row["f1"] == pytest.approx((0.7 + 0.0) / 2)
    text = dpr_age_groups.markdown(summary, 60, None)
    assert "| m | 0.3500 | 0.467 (all) | 0.333 (all) | 0.333 (all) | 0.333 (all) |" in text

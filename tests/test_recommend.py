"""Recommendations out: predict files (CSV/JSONL) and the Python API on a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import quiet_trainer, write_cohort

from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import Nearest
from lightning_modules.recommend import Recommender, UnknownCodeError, visit_record
from train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def trained(tmp_path):
    """A Nearest model with known prevalence, saved as a checkpoint."""
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)))
    model = Nearest(knowledge=data.knowledge)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    model.prevalence.copy_(torch.tensor([0.6, 0.1, 0.2, 0.9]))
    path = tmp_path / "nearest.ckpt"
    trainer.save_checkpoint(path)
    return path, data


def test_visit_record_flags_interacting_pairs(trained):
    _, data = trained
    record = visit_record(torch.tensor([0.7, 0.2, 0.55, 0.9]), 0.5, data.knowledge)
    assert record["drugs"] == ["D01A", "A01A", "C01A"]
    assert record["probabilities"] == [0.9, 0.7, 0.55]
    assert record["ddi_pairs"] == [["D01A", "A01A"]]  # the handmade cohort's one DDI pair


def test_python_api_recommends_for_a_history_given_as_codes(trained):
    path, _ = trained
    rec = Recommender.from_checkpoint(str(path))
    first = rec.recommend([{"diagnoses": ["a"], "procedures": ["x"]}])
    assert first["drugs"] == ["D01A", "A01A"]  # first visit: prevalence >= 0.5
    second = rec.recommend(
        [{"diagnoses": ["a"], "procedures": ["x"], "medications": ["B01A", "C01A"]}, {"diagnoses": ["b"]}]
    )
    assert second["drugs"] == ["C01A", "B01A"]  # previous visit's drugs, ranked by prevalence
    assert second["probabilities"] == [pytest.approx(0.6), pytest.approx(0.55)]


def test_python_api_unknown_codes_error_or_warning(trained):
    rec = Recommender.from_checkpoint(str(trained[0]))
    with pytest.raises(
        UnknownCodeError, match=r"diagnosis code\(s\) \['zzz'\] in visit 0 are not in the model's vocabulary"
    ):
        rec.recommend([{"diagnoses": ["zzz", "a"], "procedures": []}])
    with pytest.warns(UserWarning, match="ignored"):
        out = rec.recommend([{"diagnoses": ["zzz", "a"], "procedures": []}], on_unknown="ignore")
    assert out["drugs"] == ["D01A", "A01A"]
    with pytest.raises(ValueError, match="at least one visit"):
        rec.recommend([])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_predict_command_writes_one_row_per_visit(tiny_cohort, tiny_cohort_dir, tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(ROOT / "configs" / "lr.yaml"),
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.enable_progress_bar=false",
    ]
    main(["fit", *common, "--trainer.max_epochs=1", "--checkpoint.dirpath=ckpt"])
    out = tmp_path / f"recs.{fmt}"
    main(["predict", *common, "--ckpt_path=ckpt/last.ckpt", f"--predict_output.path={out}"])
    data = VisitSequenceDataModule(root=str(tiny_cohort_dir))
    expected = data.cohort.visits[data.cohort.visits["patient_id"].isin(data.splits["test"])]
    if fmt == "csv":
        rows = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert list(rows.columns) == ["patient_id", "visit_id", "drugs", "drug_names", "probabilities", "ddi_pairs"]
        assert rows["visit_id"].tolist() == expected["visit_id"].tolist()
        first = rows.iloc[0]
        drugs = first["drugs"].split()
        assert len(drugs) == len(first["probabilities"].split()) == len(first["drug_names"].split("; "))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["visit_id"] for r in rows] == expected["visit_id"].tolist()
        names = dict(zip(tiny_cohort.vocab["medication"], tiny_cohort.medication_names))
        for r in rows:
            assert r["drug_names"] == [names[d] for d in r["drugs"]]
            assert r["probabilities"] == sorted(r["probabilities"], reverse=True)
            assert all(a in r["drugs"] and b in r["drugs"] for a, b in r["ddi_pairs"])

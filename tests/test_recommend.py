"""Recommendations out: predict files (CSV/JSONL) and the Python API on a checkpoint."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import dill
import lightning as L
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, quiet_trainer, write_cohort
from test_benchmark import Voc, write_fake_benchmark

from callbacks.recommendation_writer import RecommendationWriter
from datamodules.benchmark import read_benchmark
from datamodules.cohort import Cohort
from datamodules.knowledge import CohortKnowledge, atc3_names
from datamodules.package_graph import PackageGraphDataModule
from datamodules.sources import resolve_cohort
from datamodules.synthetic import load_molecule_table
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import RETAIN, Nearest
from lightning_modules.dpr import DPRWG
from lightning_modules.recommend import (
    RecommendationOptionError,
    Recommender,
    UnknownCodeError,
    limit_record,
    visit_record,
)
from train import main

ROOT = Path(__file__).resolve().parents[1]
NAMES = {  # WHO ATC level-3 names of the handmade cohort's drugs (write_cohort)
    "A01A": "Stomatological preparations",
    "B01A": "Antithrombotic agents",
    "C01A": "Cardiac glycosides",
    "D01A": "Antifungals for topical use",
}


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
    assert record["drug_names"] == [NAMES[d] for d in record["drugs"]]  # an unnamed ATC3 cohort: table names
    assert "recorded_drugs" not in record  # recorded drugs unknown: no comparison


def test_visit_record_threshold_top_k_and_recorded_drugs(trained):
    knowledge = trained[1].knowledge
    probs = torch.tensor([0.7, 0.2, 0.55, 0.9])  # A01A, B01A, C01A, D01A
    full = visit_record(probs, 0.5, knowledge, recorded=[2, 0])
    assert full["drugs"] == ["D01A", "A01A", "C01A"]
    assert full["recorded_drugs"] == ["A01A", "C01A"]
    assert full["recorded_drug_names"] == ["Stomatological preparations", "Cardiac glycosides"]
    assert full["jaccard"] == pytest.approx(2 / 3, abs=1e-4)  # {A01A, C01A} of {D01A, A01A, C01A}
    top2 = visit_record(probs, 0.5, knowledge, top_k=2, recorded=[2, 0])
    assert top2["drugs"] == ["D01A", "A01A"] and top2["probabilities"] == [0.9, 0.7]
    assert top2["drug_names"] == ["Antifungals for topical use", "Stomatological preparations"]
    assert top2["ddi_pairs"] == [["D01A", "A01A"]]
    assert top2["jaccard"] == pytest.approx(1 / 3, abs=1e-4)  # {A01A} of {D01A, A01A, C01A}
    top1 = visit_record(probs, 0.5, knowledge, top_k=1, recorded=[2, 0])
    assert top1["drugs"] == ["D01A"] and top1["ddi_pairs"] == [] and top1["jaccard"] == 0.0
    assert visit_record(probs, 0.6, knowledge, top_k=5)["drugs"] == ["D01A", "A01A"]  # top_k caps, never adds
    assert visit_record(probs, 0.95, knowledge, recorded=[])["jaccard"] == 0.0  # both empty
    assert limit_record(full, 2) == top2  # the writer's cut equals building with top_k


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


def test_python_api_threshold_top_k_and_recorded_drugs(trained):
    rec = Recommender.from_checkpoint(str(trained[0]))
    visit = {"diagnoses": ["a"], "procedures": ["x"]}  # first visit: probabilities = prevalence 0.6, 0.1, 0.2, 0.9
    assert rec.recommend([visit], threshold=0.15)["drugs"] == ["D01A", "A01A", "C01A"]
    assert rec.recommend([visit], threshold=0.15, top_k=2)["drugs"] == ["D01A", "A01A"]
    assert rec.recommend([visit], top_k=1)["drugs"] == ["D01A"]  # the model's threshold 0.5, then the best one
    assert rec.recommend([visit], threshold=1.0)["drugs"] == []
    out = rec.recommend([{**visit, "medications": ["C01A", "A01A"]}], threshold=0.15)
    assert out["recorded_drugs"] == ["A01A", "C01A"] and out["jaccard"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["recorded_drug_names"] == ["Stomatological preparations", "Cardiac glycosides"]
    # the last visit's drugs are what is compared with, never an input: same recommendation without them
    assert out["drugs"] == rec.recommend([visit], threshold=0.15)["drugs"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threshold": 0}, r"threshold must lie in \(0, 1\], got 0"),
        ({"threshold": 1.5}, r"threshold must lie in \(0, 1\], got 1.5"),
        ({"threshold": True}, "threshold must lie in"),
        ({"top_k": 0}, r"top_k must be an integer >= 1 \(or unset for all\), got 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 1"),
        ({"top_k": -1}, "top_k must be an integer >= 1"),
    ],
)
def test_python_api_rejects_bad_threshold_or_top_k(trained, options, message):
    rec = Recommender.from_checkpoint(str(trained[0]))
    visit = {"diagnoses": ["a"], "procedures": ["x"]}
    with pytest.raises(RecommendationOptionError, match=message):
        rec.recommend([visit], **options)
    with pytest.raises(RecommendationOptionError, match=message):
        rec.recommend_batch([[visit]], **options)


def test_batch_call_equals_single_calls_in_one_forward_pass(tmp_path, monkeypatch):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)))
    torch.manual_seed(0)
    rec = Recommender(RETAIN(knowledge=data.knowledge, embedding_dim=8, hidden_dim=8))
    histories = [  # different lengths: the batch pads them
        [{"diagnoses": ["a"], "procedures": ["x"]}],
        [
            {"diagnoses": ["a", "b"], "procedures": ["x"], "medications": ["A01A", "D01A"]},
            {"diagnoses": ["c"], "procedures": ["y"], "medications": ["B01A"]},
            {"diagnoses": ["b"], "procedures": ["x", "y"], "medications": ["C01A", "A01A"]},
        ],
        [{"diagnoses": ["c"], "procedures": []}, {"diagnoses": ["a", "c"], "procedures": ["y"]}],
    ]
    singles = [rec.recommend(h, threshold=0.3, top_k=3) for h in histories]
    calls = []
    forward = rec.model.predict_probabilities
    monkeypatch.setattr(rec.model, "predict_probabilities", lambda batch: calls.append(batch) or forward(batch))
    batched = rec.recommend_batch(histories, threshold=0.3, top_k=3)
    assert len(calls) == 1 and calls[0]["visit_mask"].shape == (3, 3)  # one padded forward pass
    assert [r["drugs"] for r in batched] == [r["drugs"] for r in singles]
    assert any(r["drugs"] for r in batched)
    for one, many in zip(singles, batched):
        assert many["probabilities"] == pytest.approx(one["probabilities"], abs=2e-4)
        assert {k: v for k, v in many.items() if k != "probabilities"} == {
            k: v for k, v in one.items() if k != "probabilities"
        }
    assert batched[1]["recorded_drugs"] == ["A01A", "C01A"] and "recorded_drugs" not in batched[0]
    assert rec.recommend_batch([]) == []
    with pytest.raises(ValueError, match="at least one visit per history; history 1 has none"):
        rec.recommend_batch([histories[0], []])
    with pytest.raises(UnknownCodeError, match=r"in visit 0 of history 1 are not"):
        rec.recommend_batch([histories[0], [{"diagnoses": ["zzz"]}]])


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
    names = dict(zip(tiny_cohort.vocab["medication"], tiny_cohort.medication_names))
    if fmt == "csv":
        rows = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert list(rows.columns) == [
            "patient_id",
            "visit_id",
            "drugs",
            "drug_names",
            "probabilities",
            "ddi_pairs",
            "recorded_drugs",
            "recorded_drug_names",
            "jaccard",
        ]
        assert rows["visit_id"].tolist() == expected["visit_id"].tolist()
        first = rows.iloc[0]
        drugs = first["drugs"].split()
        assert len(drugs) == len(first["probabilities"].split()) == len(first["drug_names"].split("; "))
        rows = [
            {
                "drugs": row["drugs"].split(),
                "recorded_drugs": row["recorded_drugs"].split(),
                "recorded_drug_names": row["recorded_drug_names"].split("; "),
                "jaccard": float(row["jaccard"]),
            }
            for _, row in rows.iterrows()
        ]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["visit_id"] for r in rows] == expected["visit_id"].tolist()
        for r in rows:
            assert r["drug_names"] == [names[d] for d in r["drugs"]]
            assert r["probabilities"] == sorted(r["probabilities"], reverse=True)
            assert all(a in r["drugs"] and b in r["drugs"] for a, b in r["ddi_pairs"])
    codes = tiny_cohort.vocab["medication"]
    for r, meds in zip(rows, expected["medications"]):
        assert r["recorded_drugs"] == [codes[d] for d in sorted(meds)]
        assert r["recorded_drug_names"] == [names[d] for d in r["recorded_drugs"]]
        shared = len(set(r["drugs"]) & set(r["recorded_drugs"]))
        assert r["jaccard"] == pytest.approx(shared / len(set(r["drugs"]) | set(r["recorded_drugs"])), abs=1e-4)


# --- ATC3 names on every cohort with ATC codes -------------------------------------------------
BENCHMARK_DRUGS = ["N02B", "B01A", "L01X", "Z99Z"]  # L01X: none of the synthetic cohort's; Z99Z: no such class


def write_named_benchmark(folder: Path) -> Path:
    """Benchmark-format pickles whose medication vocabulary is ``BENCHMARK_DRUGS``."""
    records = [[[[0], [0], [0, 1]], [[1], [0], [2, 3]]], [[[0, 1], [0], [1]]]]
    write_fake_benchmark(folder, records, n_med=len(BENCHMARK_DRUGS))
    voc = {"diag_voc": Voc(["d0", "d1"]), "pro_voc": Voc(["p0"]), "med_voc": Voc(BENCHMARK_DRUGS)}
    with open(folder / "voc_final.pkl", "wb") as fh:
        dill.dump(voc, fh)
    return folder


def test_benchmark_import_names_its_atc3_drugs(tmp_path):
    folder = write_named_benchmark(tmp_path / "b")
    expected = ["Other analgesics and antipyretics", "Antithrombotic agents", "Other antineoplastic agents", "Z99Z"]
    assert read_benchmark(folder).medication_names == expected
    resolve_cohort(folder, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("benchmark-b-*")
    assert json.loads((cached / "vocab.json").read_text())["medication_names"] == expected
    assert resolve_cohort(folder, cache_dir=tmp_path / "cache").medication_names == expected  # from the cache


def test_cohorts_and_checkpoints_without_names_get_atc3_names_at_load(tmp_path):
    # a cohort cached before the importer named its drugs: vocab.json has no medication_names
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)))
    assert "medication_names" not in json.loads((tmp_path / "c" / "vocab.json").read_text())
    assert data.knowledge.medication_names == [NAMES[c] for c in ["A01A", "B01A", "C01A", "D01A"]]
    state = data.knowledge.to_state()
    assert CohortKnowledge.from_state(state).medication_names == data.knowledge.medication_names  # in the checkpoint
    # names a cohort has are kept; vocabularies other than ATC3 classes stay unnamed
    state["medication_names"] = ["w", "x", "y", "z"]
    assert CohortKnowledge.from_state(state).medication_names == ["w", "x", "y", "z"]
    cohort = Cohort.load(tmp_path / "c")
    cohort.vocab["medication"] = ["aspirin", "B01A", "C01A", "D01A"]
    cohort.ddi_pairs = [("aspirin", "D01A")]  # DDI pairs must name codes of the vocabulary
    other = tmp_path / "other"
    cohort.save(other)
    assert VisitSequenceDataModule(root=str(other)).knowledge.medication_names is None


def test_atc3_name_table_is_well_formed_and_agrees_with_the_molecule_table():
    names = atc3_names()
    assert len(names) >= 144 and all(re.fullmatch(r"[A-Z][0-9]{2}[A-Z]", code) and names[code] for code in names)
    molecules = load_molecule_table().drop_duplicates("atc3")
    shipped = dict(zip(molecules["atc3"], molecules["class_name"]))
    assert {code: names.get(code) for code in shipped} == shipped


@pytest.mark.parametrize("name, size", [("mimic3-safedrug", 112), ("mimic3-safedrug131", 131)])
def test_real_benchmarks_have_a_name_for_every_drug(name, size):
    folder = SHARED_DATA / name
    if not (folder / "voc_final.pkl").is_file():
        pytest.skip(f"real benchmark not found at {folder}")
    cohort = read_benchmark(folder)
    codes, names = cohort.vocab["medication"], cohort.medication_names
    assert len(codes) == len(names) == size
    assert [c for c, n in zip(codes, names) if n == c] == []  # every code found in the shipped table


# --- predict: recorded drugs, threshold, top_k --------------------------------------------------
def test_predict_threshold_is_checked_and_names_the_option(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)))
    model = Nearest(knowledge=data.knowledge)
    model.threshold = 0.0
    with pytest.raises(RecommendationOptionError, match=r"threshold \(--model.init_args.threshold\) must lie in"):
        quiet_trainer().predict(model, datamodule=data)


def test_package_recommenders_predict_recorded_drugs(tiny_cohort, tiny_cohort_dir, tmp_path):
    data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16)
    L.seed_everything(0)
    model = DPRWG(knowledge=data.knowledge, embedding_dim=8, hidden_dim=8, pretrain_epochs=1, generation="heuristic")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    visits = tiny_cohort.visits.set_index("visit_id")["medications"]
    codes = tiny_cohort.vocab["medication"]
    for generation in ("heuristic", "candidates"):
        model.hparams.generation = generation
        records = [r for batch in trainer.predict(model, datamodule=data) for r in batch]
        assert records
        for r in records:
            assert r["recorded_drugs"] == [codes[d] for d in sorted(set(visits[r["visit_id"]]))]
            assert len(r["recorded_drug_names"]) == len(r["recorded_drugs"]) and r["recorded_drug_names"][0]


def _predict_cli(cohort_dir: Path, *extra: str) -> None:
    main(
        [
            "predict",
            "--config",
            str(ROOT / "configs" / "lr.yaml"),
            f"--data.init_args.root={cohort_dir}",
            "--trainer.enable_progress_bar=false",
            "--ckpt_path=ckpt/last.ckpt",
            *extra,
        ]
    )


def test_predict_top_k_option_of_the_writer(tiny_cohort_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "lr.yaml"),
            f"--data.init_args.root={tiny_cohort_dir}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1",
            "--checkpoint.dirpath=ckpt",
        ]
    )
    _predict_cli(tiny_cohort_dir, "--predict_output.path=all.jsonl")
    _predict_cli(tiny_cohort_dir, "--predict_output.path=top2.jsonl", "--predict_output.top_k", "2")
    full = [json.loads(line) for line in Path("all.jsonl").read_text().splitlines()]
    top2 = [json.loads(line) for line in Path("top2.jsonl").read_text().splitlines()]
    assert any(len(r["drugs"]) > 2 for r in full)
    assert top2 == [limit_record(r, 2) for r in full]  # the two most probable of each visit's recommendation
    assert all(len(r["drugs"]) <= 2 for r in top2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _predict_cli(tiny_cohort_dir, "--predict_output.top_k=0")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "medrec: error: predict_output.top_k must be an integer >= 1 (or unset for all), got 0" in err
    with pytest.raises(RecommendationOptionError, match="predict_output.top_k must be an integer"):
        RecommendationWriter(top_k=-3)


@pytest.mark.slow
def test_readme_predict_command_after_a_tiny_fit(tmp_path):
    """README's predict command, verbatim but for the checkpoint path of the fit just run."""
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^python train\.py predict --config configs/retain\.yaml .*$", readme, flags=re.M)
    assert "runs/…/last.ckpt" in command and "--predict_output.path recs.jsonl" in command
    for path in ("configs", "train.py"):  # run from a folder of its own, so runs/ and recs.jsonl land there
        (tmp_path / path).symlink_to(ROOT / path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(args: list[str]) -> None:
        done = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    run(["python", "train.py", "fit", "--config", "configs/retain.yaml", *tiny])
    (checkpoint,) = (tmp_path / "runs").glob("**/last.ckpt")
    run(shlex.split(command.replace("runs/…/last.ckpt", str(checkpoint.relative_to(tmp_path)))))
    rows = [json.loads(line) for line in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert rows and any(r["drugs"] for r in rows)
    for r in rows:
        assert len(r["drug_names"]) == len(r["drugs"]) and all(r["drug_names"])
        assert r["recorded_drugs"] and len(r["recorded_drug_names"]) == len(r["recorded_drugs"])
        assert 0.0 <= r["jaccard"] <= 1.0


def test_package_recommenders_recommend_from_their_checkpoint_alone(tiny_cohort, tiny_cohort_dir, tmp_path):
    """The candidate pool travels in the checkpoint's knowledge: no DataModule is needed to recommend."""
    from lightning_modules.ncf import NCF

    data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16)
    vocab = data.knowledge.vocab
    history = [
        {
            "diagnoses": vocab["diagnosis"][:2],
            "procedures": vocab["procedure"][:1],
            "medications": vocab["medication"][:2],
        },
        {"diagnoses": vocab["diagnosis"][2:4], "procedures": [], "medications": vocab["medication"][1:3]},
    ]
    training = {tuple(sorted(vocab["medication"][d] for d in p)) for p in data.knowledge.training_visits.packages}
    for model in (
        DPRWG(knowledge=data.knowledge, embedding_dim=8, hidden_dim=8, pretrain_epochs=1),
        NCF(knowledge=data.knowledge, recommend="nearest", embedding_dim=8, hidden_dim=8),
    ):
        L.seed_everything(0)
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data)
        path = tmp_path / f"{type(model).__name__}.ckpt"
        trainer.save_checkpoint(path)
        rec = Recommender.from_checkpoint(str(path))
        assert rec.model._pool is None  # nothing carried over from the fit
        record = rec.recommend(history)
        assert tuple(sorted(record["drugs"])) in training  # the chosen package is a training package
        assert record["recorded_drugs"] == sorted(vocab["medication"][1:3])
        assert rec.recommend_batch([history, history[:1]])[0]["drugs"] == record["drugs"]

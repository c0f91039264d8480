"""Raw MIMIC-III / MIMIC-IV ETL: round trip from synthetic raw tables, the reference rules,
the cache, bad input, and the open MIMIC-III demo when ../shared is present."""

from __future__ import annotations

import ast
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from benchmarks.synthetic_raw import RawSpec, expected_visits, write_raw_mimic
from datamodules.cohort import Cohort, CohortError
from datamodules.mimic import EtlOptions, build_cohort, prepare_cohort, read_etl_report
from datamodules.mimic import etl as etl_module
from datamodules.mimic.cli import main as prepare_main
from datamodules.sources import detect_source, resolve_cohort
from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort

ALL = EtlOptions(min_admissions=1, top_diagnoses=None, top_medications=None)
DEMO = SHARED_DATA / "mimic3-demo"
SHARED_MAPPINGS = SHARED_DATA / "mappings"


@pytest.fixture(scope="module")
def small_cohort():
    return generate_synthetic_cohort(SyntheticSpec(patients=60, seed=5))


@pytest.fixture()
def raw3(small_cohort, tmp_path):
    """Uncompressed MIMIC-III layout that a test may damage."""
    manifest = write_raw_mimic(small_cohort, tmp_path / "mimic3", RawSpec(layout="mimic3", compress=False))
    return Path(manifest.folder)


def etl_visits(cohort: Cohort) -> pd.DataFrame:
    """The ETL's cohort as raw ids and code strings, in the shape of ``expected_visits``."""
    v = cohort.visits
    out = pd.DataFrame({"subject_id": v["patient_id"].astype(int), "hadm_id": v["visit_id"].astype(int)})
    out["visit_order"] = v["visit_order"].to_numpy()
    for column, name in (
        ("diagnoses", "diagnosis"),
        ("procedures", "procedure"),
        ("medications", "medication"),
        ("labs", "lab"),
    ):
        vocab = cohort.vocab[name]
        out[column] = [frozenset(vocab[i] for i in row) for row in v[column]]
    for column in ("los", "age", "gender"):
        out[column] = v[column].to_numpy()
    return out.set_index("hadm_id").sort_index()


# --- round trip ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, age_tolerance",
    [
        (RawSpec(layout="mimic3", copies=2), 0.11),  # full-release spelling: upper-case, .csv.gz
        (RawSpec(layout="mimic3", upper_case_columns=False, compress=False), 0.11),  # demo spelling, .csv
        (RawSpec(layout="mimic4"), 2.0),  # MIMIC-IV ages have year resolution (anchor_age/anchor_year)
    ],
    ids=["mimic3-upper-gz", "mimic3-lower-csv", "mimic4"],
)
def test_round_trip_reproduces_generator(tiny_cohort, tmp_path, spec, age_tolerance):
    manifest = write_raw_mimic(tiny_cohort, tmp_path / "raw", spec)
    assert detect_source(manifest.folder) == spec.layout
    cohort, report = build_cohort(manifest.folder, spec.layout, ALL)
    want = expected_visits(tiny_cohort, manifest).set_index("hadm_id").sort_index()
    got = etl_visits(cohort)

    assert len(got) == len(tiny_cohort.visits) * spec.copies
    assert got.index.equals(want.index)
    for column in ("subject_id", "visit_order", "diagnoses", "procedures", "medications", "labs", "gender"):
        mismatched = got[column] != want[column]
        assert not mismatched.any(), f"{column}: first mismatch at hadm {got.index[mismatched.argmax()]}"
    np.testing.assert_allclose(got["los"], want["los"], atol=1e-6)
    assert np.abs(got["age"] - want["age"]).max() <= age_tolerance
    assert cohort.visits["age"].max() == 90.0 and report["fields"]["age_capped_visits"] > 0
    assert report["steps"][0] == {"step": "admissions", "admissions": len(got), "patients": got["subject_id"].nunique()}
    assert {s["admissions"] for s in report["steps"]} == {len(got)}  # nothing filtered with ALL

    # knowledge: TWOSIDES tail-40 types only, mapped to the vocabulary; SMILES of the prescribed names
    meds = set(cohort.vocab["medication"])
    adverse = {tuple(sorted(p)) for p in tiny_cohort.ddi_pairs if set(p) <= meds}
    assert set(cohort.ddi_pairs) == adverse and len(adverse) > 20
    assert all(set(s) <= set(tiny_cohort.smiles[code]) and 1 <= len(s) <= 3 for code, s in cohort.smiles.items())
    assert set(cohort.smiles) == meds
    assert report["drug_mapping"]["unmapped_rows"] > 0  # the noise rows with an unknown NDC


def test_ddi_head_rule_keeps_other_pairs(tiny_cohort, tmp_path):
    manifest = write_raw_mimic(tiny_cohort, tmp_path / "raw", RawSpec(layout="mimic4", lab_rows_per_visit=0))
    tail, _ = build_cohort(manifest.folder, "mimic4", ALL)
    head, report = build_cohort(manifest.folder, "mimic4", replace(ALL, ddi_side_effects=5, ddi_keep="head"))
    assert report["ddi"]["kept_types"] == 5 and report["ddi"]["side_effect_types"] == 45
    assert head.ddi_pairs and not set(head.ddi_pairs) & set(tail.ddi_pairs)


# --- the reference rules ---------------------------------------------------------------------
def _reference_medications(folder: Path, min_admissions: int, top: int) -> tuple[set[int], list[str]]:
    """SafeDrug's processing.py re-done in pandas on the raw files: admissions left, top classes."""
    rx = pd.read_csv(folder / "PRESCRIPTIONS.csv", dtype={"NDC": str})
    rx = rx[rx["NDC"].notna() & (rx["NDC"] != "0")]
    rx = rx[["SUBJECT_ID", "HADM_ID", "STARTDATE", "DRUG", "NDC"]].drop_duplicates()
    visits = rx.groupby("SUBJECT_ID")["HADM_ID"].nunique()
    rx = rx[rx["SUBJECT_ID"].isin(visits[visits >= min_admissions].index)]
    ndc2rxcui = ast.literal_eval((folder / "mappings" / "ndc2RXCUI.txt").read_text())
    rx = rx.assign(RXCUI=rx["NDC"].map(ndc2rxcui)).dropna()
    atc = pd.read_csv(folder / "mappings" / "RXCUI2atc4.csv", dtype=str).drop_duplicates("RXCUI")
    rx = rx.merge(atc[["RXCUI", "ATC4"]], on="RXCUI").assign(ATC3=lambda f: f["ATC4"].str[:4])
    rx = rx.drop(columns=["NDC", "RXCUI", "ATC4"]).drop_duplicates()
    counts = rx.groupby("ATC3").size().reset_index(name="n").sort_values(["n", "ATC3"], ascending=[False, True])
    kept = list(counts["ATC3"][:top])
    return set(rx.loc[rx["ATC3"].isin(kept), "HADM_ID"]), sorted(kept)


def test_reference_defaults_min_admissions_and_top_drugs(raw3, small_cohort):
    cohort, report = build_cohort(raw3, "mimic3", EtlOptions(top_medications=8))
    admissions, kept = _reference_medications(raw3, 2, 8)
    assert sorted(cohort.vocab["medication"]) == kept
    assert set(cohort.visits["visit_id"].astype(int)) == admissions  # every synthetic visit has diagnoses/procedures
    per_patient = small_cohort.visits.groupby("patient_id").size()
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["min_admissions"]["patients"] == int((per_patient >= 2).sum())
    assert steps["min_admissions"]["admissions"] == int(per_patient[per_patient >= 2].sum())
    assert steps["top_drugs"]["admissions"] == len(admissions)
    counts = [s["admissions"] for s in report["steps"]]
    assert counts == sorted(counts, reverse=True)


def test_min_admissions_final_stage_and_keep_all(raw3, small_cohort):
    final, report = build_cohort(raw3, "mimic3", EtlOptions(min_admissions=3, min_admissions_stage="final"))
    assert report["steps"][-1]["step"] == "final_min_admissions"
    assert final.visits.groupby("patient_id").size().min() >= 3
    everyone, _ = build_cohort(raw3, "mimic3", EtlOptions(min_admissions=1))
    assert everyone.num_patients == small_cohort.num_patients


def test_first_day_drugs_window(raw3):
    cohort, report = build_cohort(raw3, "mimic3", EtlOptions(min_admissions=1, drug_window_hours=24))
    rx = pd.read_csv(raw3 / "PRESCRIPTIONS.csv", dtype={"NDC": str}, parse_dates=["STARTDATE"])
    adm = pd.read_csv(raw3 / "ADMISSIONS.csv", parse_dates=["ADMITTIME"])
    rx = rx.merge(adm[["HADM_ID", "ADMITTIME"]], on="HADM_ID")
    early = rx[(rx["STARTDATE"] < rx["ADMITTIME"] + pd.Timedelta(hours=24)) & ~rx["NDC"].isin(["0", "99999999999"])]
    assert report["steps"][1]["step"] == "prescribed_first_24h"
    assert set(cohort.visits["visit_id"].astype(int)) == set(early["HADM_ID"])
    ndc_atc = _ndc_atc3(raw3)
    got = etl_visits(cohort)
    want = early.assign(ATC3=early["NDC"].map(ndc_atc)).groupby("HADM_ID")["ATC3"].agg(frozenset)
    assert (got["medications"] == want.reindex(got.index)).all()


def _ndc_atc3(folder: Path) -> dict[str, str]:
    ndc2rxcui = ast.literal_eval((folder / "mappings" / "ndc2RXCUI.txt").read_text())
    atc = pd.read_csv(folder / "mappings" / "RXCUI2atc4.csv", dtype=str).drop_duplicates("RXCUI")
    rxcui2atc3 = dict(zip(atc["RXCUI"], atc["ATC4"].str[:4]))
    return {ndc: rxcui2atc3[r] for ndc, r in ndc2rxcui.items()}


def test_mimic4_icd_tokens_gem_map_and_icu_los(small_cohort, tmp_path):
    manifest = write_raw_mimic(small_cohort, tmp_path / "raw", RawSpec(layout="mimic4", lab_rows_per_visit=0))
    code = small_cohort.vocab["diagnosis"][small_cohort.visits["diagnoses"].iloc[0][0]]
    gem = tmp_path / "2018_I9gem.txt"
    gem.write_text(f"{code}     I10     00000\n99999     NoDx    11000\n")
    options = EtlOptions(min_admissions=1, diagnosis_icd_map=str(gem), los_source="icu")
    cohort, _ = build_cohort(manifest.folder, "mimic4", options)
    vocab = cohort.vocab["diagnosis"]
    assert "10:I10" in vocab and f"9:{code}" not in vocab
    assert all(c.startswith(("9:", "10:")) for c in vocab)
    assert all(c.startswith("9:") for c in cohort.vocab["procedure"])
    icu = pd.read_csv(Path(manifest.folder) / "icu" / "icustays.csv.gz", parse_dates=["intime", "outtime"])
    icu_days = ((icu["outtime"] - icu["intime"]).dt.total_seconds() / 86400).set_axis(icu["hadm_id"].astype(str))
    np.testing.assert_allclose(cohort.visits["los"], icu_days.reindex(cohort.visits["visit_id"]).to_numpy())
    plain, _ = build_cohort(manifest.folder, "mimic4", EtlOptions(min_admissions=1, icd_version_tokens=False))
    assert code in plain.vocab["diagnosis"]


# --- sources, cache, CLI ---------------------------------------------------------------------
def test_raw_root_trains_through_the_datamodule_and_caches(small_cohort, tmp_path, monkeypatch):
    from datamodules.visit_sequence import VisitSequenceDataModule

    raw = Path(write_raw_mimic(small_cohort, tmp_path / "raw", RawSpec(layout="mimic4")).folder)
    monkeypatch.delenv("MEDREC_MAPPINGS", raising=False)  # found in raw/mappings
    dm = VisitSequenceDataModule(root=str(raw), cache_dir=str(tmp_path / "cache"), min_visits=1)
    knowledge = dm.knowledge
    assert knowledge.source == "mimic4:raw" and knowledge.num_labs > 0 and knowledge.ddi_adj.sum() > 0
    assert {"los", "age", "labs", "gender"} <= set(knowledge.fields)
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and read_etl_report(built[0])["cohort"]["visits"] == len(dm.cohort.visits)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(etl_module, "build_cohort", no_rebuild)
    started = time.perf_counter()
    again = resolve_cohort(str(raw), cache_dir=str(tmp_path / "cache"))
    assert time.perf_counter() - started < 5
    assert again.visits["visit_id"].tolist() == dm.cohort.visits["visit_id"].tolist()
    with pytest.raises(AssertionError, match="cache should"):  # other options: another cohort
        resolve_cohort(str(raw), cache_dir=str(tmp_path / "cache"), etl=EtlOptions(min_admissions=1))
    (raw / "hosp" / "d_labitems.csv.gz").touch()  # not an input: still cached
    resolve_cohort(str(raw), cache_dir=str(tmp_path / "cache"))
    (raw / "mappings" / "drug-DDI.csv").write_text((raw / "mappings" / "drug-DDI.csv").read_text() + "\n")
    with pytest.raises(AssertionError, match="cache should"):  # an input changed
        resolve_cohort(str(raw), cache_dir=str(tmp_path / "cache"))


def test_older_etl_output_is_rebuilt_and_older_cohort_is_refused(raw3, tmp_path):
    out = tmp_path / "cohort"
    prepare_cohort(raw3, options=ALL, out=out)
    meta = json.loads((out / "etl.json").read_text())
    (out / "etl.json").write_text(json.dumps({**meta, "etl_version": 0}))
    before = (out / "etl.json").stat().st_mtime_ns
    prepare_cohort(raw3, options=ALL, out=out)
    assert json.loads((out / "etl.json").read_text())["etl_version"] == etl_module.ETL_VERSION
    assert (out / "etl.json").stat().st_mtime_ns != before
    cohort_meta = json.loads((out / "cohort.json").read_text())
    (out / "cohort.json").write_text(json.dumps({**cohort_meta, "format_version": 0}))
    with pytest.raises(CohortError, match="cohort format version 0, this medrec reads 1; re-create"):
        resolve_cohort(str(out))


def test_interrupted_write_leaves_previous_cohort(raw3, tmp_path, monkeypatch):
    out = tmp_path / "cohort"
    first = prepare_cohort(raw3, options=ALL, out=out)

    def interrupt(self, target):  # every file written, then the run is killed before the swap
        (staged,) = tmp_path.glob(".*.staging-*")
        assert {"cohort.json", "etl.json", "visits.parquet"} <= {p.name for p in staged.iterdir()}
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_cohort(raw3, options=EtlOptions(min_admissions=2), out=out, force=True)
    with pytest.raises(KeyboardInterrupt):
        prepare_cohort(raw3, options=ALL, out=tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "mimic3"]  # no staging left over
    monkeypatch.undo()
    assert len(Cohort.load(out).visits) == len(first.visits)


def test_output_folder_that_is_not_a_cohort_is_not_replaced(raw3, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(CohortError, match="exists and is not a cohort folder; refusing to replace it"):
        prepare_cohort(raw3, options=ALL, out=out)
    assert (out / "thesis.tex").read_text() == "keep me"


def test_cli_writes_cohort_and_reports(raw3, tmp_path, capsys):
    out = tmp_path / "cohort"
    prepare_main([str(raw3), "--out", str(out), "--min_admissions", "1", "--top_medications", "null"])
    printed = capsys.readouterr().out
    assert "with_procedures" in printed and f"--data.init_args.root={out}" in printed
    assert Cohort.load(out).summary()["ddi_pairs"] > 0
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip() == f"medrec-prepare: error: MIMIC folder {tmp_path / 'nowhere'} does not "
        "exist or is not a folder"
    )


# --- bad input -------------------------------------------------------------------------------
def _rewrite(path: Path, change) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame).to_csv(path, index=False)


BAD_INPUTS = {
    "missing table": (lambda r: (r / "PROCEDURES_ICD.csv").unlink(), r"PROCEDURES_ICD\.csv\(\.gz\) is missing"),
    "missing column": (
        lambda r: _rewrite(r / "PRESCRIPTIONS.csv", lambda f: f.drop(columns="NDC")),
        r"PRESCRIPTIONS\.csv: missing column\(s\) \['ndc'\]",
    ),
    "unparseable date": (
        lambda r: _rewrite(
            r / "ADMISSIONS.csv", lambda f: f.assign(ADMITTIME=f["ADMITTIME"].where(f.index != 3, "31/02/2101"))
        ),
        r"ADMISSIONS\.csv: column 'ADMITTIME' has 1 unparseable date value\(s\), e\.g\. '31/02/2101'",
    ),
    "unparseable start date": (
        lambda r: _rewrite(r / "PRESCRIPTIONS.csv", lambda f: f.assign(STARTDATE="soon")),
        r"PRESCRIPTIONS\.csv: column 'STARTDATE' has \d+ unparseable date value\(s\)",
    ),
    "empty table": (
        lambda r: _rewrite(r / "DIAGNOSES_ICD.csv", lambda f: f.iloc[:0]),
        r"DIAGNOSES_ICD\.csv: table is empty",
    ),
    "zero-byte file": (lambda r: (r / "PATIENTS.csv").write_text(""), r"PATIENTS\.csv: file is empty"),
    "mapping maps nothing": (
        lambda r: _rewrite(r / "mappings" / "RXCUI2atc4.csv", lambda f: f.assign(RXCUI="1")),
        r"RXCUI2atc4\.csv: shares no RXCUI with .*ndc2RXCUI\.txt.*maps nothing",
    ),
    "no mapping files": (
        lambda r: [(r / "mappings" / n).unlink() for n in ("ndc2RXCUI.txt", "RXCUI2atc4.csv")],
        r"no NDC -> ATC drug mapping found",
    ),
    "no ndc usable": (
        lambda r: _rewrite(r / "PRESCRIPTIONS.csv", lambda f: f.assign(NDC="0")),
        r"PRESCRIPTIONS\.csv: no row has a usable NDC",
    ),
    "conflicting admission rows": (
        lambda r: _rewrite(r / "ADMISSIONS.csv", lambda f: pd.concat([f, f.iloc[:1].assign(DISCHTIME="2199-01-01")])),
        r"ADMISSIONS\.csv: hadm_id 100000 occurs 2 times with different values",
    ),
}


@pytest.mark.parametrize("damage, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_clear_error_and_writes_nothing(raw3, tmp_path, monkeypatch, damage, message):
    monkeypatch.delenv("MEDREC_MAPPINGS", raising=False)
    damage(raw3)
    with pytest.raises(CohortError, match=message):
        prepare_cohort(raw3, options=ALL, out=tmp_path / "cohort")
    assert not (tmp_path / "cohort").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_malformed_row_past_the_sniffed_sample_names_file_and_line(small_cohort, tmp_path):
    spec = RawSpec(layout="mimic4", compress=False, lab_rows_per_visit=200)
    raw = Path(write_raw_mimic(small_cohort, tmp_path / "raw", spec).folder)
    labevents = raw / "hosp" / "labevents.csv"
    rows = labevents.read_text().count("\n")
    assert rows > 25_000  # beyond DuckDB's sniffing sample
    with open(labevents, "a") as fh:
        fh.write('1,2,3,"unterminated\n')
    with pytest.raises(CohortError, match=rf"labevents\.csv: cannot be processed \(.*CSV Error on Line: {rows + 1}"):
        build_cohort(raw, "mimic4", ALL)


def test_ndc_atc_file_that_maps_no_prescription(raw3, tmp_path):
    plain = tmp_path / "ndc_atc.csv"
    plain.write_text("ndc,atc\n12345678901,N02BE01\n")
    with pytest.raises(
        CohortError,
        match=r"ndc_atc\.csv: the drug mapping maps none of the \d+ distinct NDCs in "
        r"PRESCRIPTIONS\.csv",
    ):
        build_cohort(raw3, "mimic3", EtlOptions(ndc_atc=str(plain)))


def test_duplicated_rows_are_removed_and_counted(raw3):
    clean, _ = build_cohort(raw3, "mimic3", ALL)
    for name, k in (("ADMISSIONS.csv", 3), ("DIAGNOSES_ICD.csv", 5), ("PATIENTS.csv", 2)):
        _rewrite(raw3 / name, lambda f, k=k: pd.concat([f, f.iloc[:k]]))
    dup, report = build_cohort(raw3, "mimic3", ALL)
    assert [report["tables"][t]["duplicate_rows"] for t in ("admissions", "diagnoses", "patients")] == [3, 5, 2]
    assert any("DIAGNOSES_ICD.csv: 5 duplicated row(s) removed" in n for n in report["notes"])
    pd.testing.assert_frame_equal(dup.visits, clean.visits)


# --- the open MIMIC-III demo -------------------------------------------------------------------
DEMO_ATC4 = {  # the demo's most prescribed drugs, by name
    "furosemide": "C03CA",
    "sodium chloride": "B05XA",
    "ns": "B05XA",
    "potassium chloride": "A12BA",
    "magnesium sulfate": "A12CC",
    "d5w": "B05BA",
    "dextrose": "B05BA",
    "heparin": "B01AB",
    "lr": "B05BB",
    "vancomycin": "J01XA",
    "morphine": "N02AA",
    "calcium gluconate": "A12AA",
    "acetaminophen": "N02BE",
    "pantoprazole": "A02BC",
    "metoprolol": "C07AB",
    "senna": "A06AB",
    "insulin": "A10AE",  # the one insulin NDC the test maps (00088222033) is insulin glargine
    "docusate": "A06AA",
}


@pytest.mark.skipif(not (DEMO / "ADMISSIONS.csv.gz").is_file(), reason=f"MIMIC-III demo not found at {DEMO}")
def test_mimic3_demo(tmp_path):
    """Counts after every filter on the 100-patient demo with a mapping of its most frequent NDCs."""
    ndc2rxcui = ast.literal_eval((SHARED_MAPPINGS / "ndc2RXCUI.txt").read_text())
    rx = pd.read_csv(DEMO / "PRESCRIPTIONS.csv.gz", dtype=str)
    rows = []
    for (ndc, drug), _ in rx.groupby(["ndc", "drug"]).size().sort_values(ascending=False).head(80).items():
        atc = next((a for k, a in DEMO_ATC4.items() if drug.lower().startswith(k)), None)
        if atc and ndc2rxcui.get(ndc):
            rows.append((ndc2rxcui[ndc], atc, ndc, 2016, 1))
    mapping = tmp_path / "RXCUI2atc4.csv"
    pd.DataFrame(rows, columns=["RXCUI", "ATC4", "NDC", "YEAR", "MONTH"]).to_csv(mapping, index=False)
    options = EtlOptions(ndc2rxcui=str(SHARED_MAPPINGS / "ndc2RXCUI.txt"), rxcui2atc4=str(mapping))
    assert detect_source(DEMO) == "mimic3"
    cohort, report = build_cohort(DEMO, "mimic3", options)
    steps = [(s["step"], s["admissions"], s["patients"]) for s in report["steps"]]
    assert steps == [
        ("admissions", 129, 100),
        ("prescribed", 122, 94),
        ("min_admissions", 41, 13),
        ("drug_mapped", 41, 13),
        ("top_drugs", 41, 13),
        ("with_diagnoses", 41, 13),
        ("with_procedures", 38, 13),
    ]
    assert report["tables"]["prescriptions"]["rows"] == 10398
    assert report["tables"]["prescriptions"]["rows_without_usable_ndc"] == 1478
    assert 0 < report["drug_mapping"]["unmapped_fraction"] < 1
    assert set(cohort.vocab["medication"]) <= {atc[:4] for atc in DEMO_ATC4.values()}
    assert len(cohort.vocab["medication"]) == 14 and len(cohort.visits) == 38
    los, age = cohort.visits["los"], cohort.visits["age"]
    assert los.notna().all() and (los > 0).all() and los.max() < 365 and 2 < los.median() < 15
    adm = pd.read_csv(DEMO / "ADMISSIONS.csv.gz", parse_dates=["admittime", "dischtime"], index_col="hadm_id")
    raw_los = (adm["dischtime"] - adm["admittime"]).dt.total_seconds() / 86400
    np.testing.assert_allclose(los, raw_los.reindex(cohort.visits["visit_id"].astype(int)).to_numpy())
    assert age.notna().all() and age.min() >= 15 and age.max() == 90.0 and 50 < age.median() < 80
    assert report["fields"]["age_capped_visits"] >= 1
    assert set(cohort.visits["gender"]) == {"F", "M"}
    assert cohort.visits.groupby("patient_id")["time"].is_monotonic_increasing.all()

"""Hardening (issue 23), ETL cases: malformed raw rows and mapping files stop ``medrec-prepare``
with one ``medrec-prepare: error:`` line naming the file (exit code 2), and write nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks.synthetic_raw import RawSpec, write_raw_mimic
from datamodules.mimic.cli import main as prepare_main
from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort


@pytest.fixture(scope="module")
def small_cohort():
    return generate_synthetic_cohort(SyntheticSpec(patients=40, seed=5))


@pytest.fixture()
def raw(small_cohort, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDREC_MAPPINGS", raising=False)
    return Path(write_raw_mimic(small_cohort, tmp_path / "raw", RawSpec(layout="mimic3", compress=False)).folder)


def prepare_fails(raw: Path, out: Path, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        prepare_main([str(raw), "--out", str(out), "--min_admissions", "1", "--quiet", "true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert not out.exists()
    return lines[0]


def test_diagnosis_row_with_a_malformed_hadm_id(raw, tmp_path, capsys):
    path = raw / "DIAGNOSES_ICD.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[3, "HADM_ID"] = "abc"
    frame.to_csv(path, index=False)
    line = prepare_fails(raw, tmp_path / "out", capsys)
    assert line == f"medrec-prepare: error: {path}: column 'HADM_ID' has 1 unparseable integer id value(s), e.g. 'abc'"


def test_empty_ndc2rxcui_mapping(raw, tmp_path, capsys):
    path = raw / "mappings" / "ndc2RXCUI.txt"
    path.write_text("{}\n")
    line = prepare_fails(raw, tmp_path / "out", capsys)
    assert (
        line == f"medrec-prepare: error: {path}: the NDC -> RXCUI dict is empty ({{}}); no prescription could be mapped"
    )


def test_spill_folder_of_a_killed_etl_is_removed(raw, tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys
    import tempfile

    from datamodules.mimic.etl import build_cohort

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    leftover = tmp_path / f".medrec-duckdb.staging-{socket.gethostname()}-{dead}.x1y2"
    leftover.mkdir()
    (leftover / "duckdb_temp_storage-0.tmp").write_bytes(b"0" * 1000)
    build_cohort(raw, "mimic3")
    assert not leftover.exists()
    assert not list(tmp_path.glob(".medrec-duckdb.*"))  # its own spill folder is gone too


def test_staging_folder_of_a_killed_prepare_is_removed(raw, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    leftover = tmp_path / f".out.staging-{socket.gethostname()}-{dead}.abcd"
    (leftover / "cohort").mkdir(parents=True)
    (leftover / "cohort" / "visits.parquet").write_bytes(b"0" * 2_300_000)
    prepare_main([str(raw), "--out", str(tmp_path / "out"), "--min_admissions", "1", "--quiet", "true"])
    assert not leftover.exists() and (tmp_path / "out" / "cohort.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

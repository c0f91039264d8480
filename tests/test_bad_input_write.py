"""Hardening (issue 23), "never delete what medrec did not write": writing a cohort onto a folder
medrec did not write (from the same source) is refused without force; a killed writer's staging
folder is cleaned up; a shared cache stays readable; readers wait for a concurrent writer."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_cohort

from datamodules.atomic import staging_prefix
from datamodules.cohort import Cohort, CohortError
from datamodules.mimic.cli import main as prepare_main
from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cohort(tmp_path):
    return Cohort.load(write_cohort(tmp_path / "original"))


def test_save_onto_a_non_cohort_folder_is_refused(cohort, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(CohortError, match=rf"{mine} exists and is not a cohort folder; refusing to replace it"):
        cohort.save(mine)
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_save_onto_a_cohort_folder_with_a_user_file_is_refused(cohort, tmp_path):
    folder = cohort.save(tmp_path / "c")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CohortError, match=r"holds file\(s\) medrec did not write \(notes\.txt\); refusing"):
        cohort.save(folder)
    assert (folder / "notes.txt").read_text() == "mine"


def test_save_onto_a_cohort_of_another_source_needs_force(cohort, tmp_path):
    other = generate_synthetic_cohort(SyntheticSpec(patients=40, seed=1))
    folder = other.save(tmp_path / "c")
    with pytest.raises(CohortError, match=r"holds a cohort of another source \('synthetic.*this one is 'handmade'"):
        cohort.save(folder)
    assert Cohort.load(folder).source == other.source
    cohort.save(folder, force=True)
    assert Cohort.load(folder).source == "handmade"


def test_save_replaces_its_own_cohort(cohort, tmp_path):
    folder = cohort.save(tmp_path / "c")
    cohort.save(folder)  # same source, only medrec's files: replaced without asking
    assert Cohort.load(folder).summary() == cohort.summary()


def test_save_onto_a_file_is_refused(cohort, tmp_path):
    (tmp_path / "c").write_text("a file")
    with pytest.raises(CohortError, match="exists and is not a folder"):
        cohort.save(tmp_path / "c", force=True)


def test_staging_folder_of_a_killed_writer_is_removed(cohort, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "c"
    leftover = tmp_path / f".c.staging-{socket.gethostname()}-{dead_pid}.abc123"
    leftover.mkdir()
    (leftover / "visits.parquet").write_bytes(b"x" * 2_000_000)
    live = Path(f"{tmp_path / ''}{staging_prefix(target)}live")  # this process: a writer still at work
    live.mkdir()
    cohort.save(target)
    assert not leftover.exists() and live.exists()
    assert Cohort.load(target).summary() == cohort.summary()


def test_saved_cohort_is_readable_by_the_group(cohort, tmp_path):
    old = os.umask(0o022)
    try:
        folder = cohort.save(tmp_path / "shared")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(folder.stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)  # mkdtemp's 0700 would lock other users of MEDREC_CACHE out


def test_cache_onto_a_foreign_folder_is_refused(tmp_path):
    from datamodules.visit_sequence import VisitSequenceDataModule

    dm = VisitSequenceDataModule(synthetic_patients=40, cache_dir=str(tmp_path))
    target = tmp_path / dm.synthetic.cache_key()
    target.mkdir()
    (target / "results.csv").write_text("precious")
    with pytest.raises(CohortError, match="exists and is not a cohort folder; refusing to replace it"):
        dm.prepare_data()
    assert (target / "results.csv").read_text() == "precious"


def test_medrec_prepare_onto_a_hand_made_cohort_keeps_the_users_file(cohort, tmp_path, capsys):
    from benchmarks.synthetic_raw import RawSpec, write_raw_mimic

    raw = Path(
        write_raw_mimic(
            generate_synthetic_cohort(SyntheticSpec(patients=40, seed=5)),
            tmp_path / "raw",
            RawSpec(layout="mimic3", compress=False),
        ).folder
    )
    out = cohort.save(tmp_path / "handmade")
    (out / "README.md").write_text("my notes")
    with pytest.raises(SystemExit) as info:
        prepare_main([str(raw), "--out", str(out), "--min_admissions", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"medrec-prepare: error: {out} holds file(s) medrec did not write (README.md); refusing to replace it "
        "(move it away or pass --force (force=True) to replace it)"
    )
    assert (out / "README.md").read_text() == "my notes"
    (out / "README.md").unlink()
    with pytest.raises(SystemExit):  # a cohort of another source: also refused without --force
        prepare_main([str(raw), "--out", str(out), "--min_admissions", "1"])
    assert "holds a cohort of another source ('handmade'" in capsys.readouterr().err
    prepare_main([str(raw), "--out", str(out), "--min_admissions", "1", "--force", "true", "--quiet", "true"])
    assert Cohort.load(out).source.startswith("mimic3:")


def test_load_during_a_concurrent_replace_succeeds(cohort, tmp_path):
    import dataclasses

    meds = cohort.vocab["medication"]
    cohort = dataclasses.replace(
        cohort,
        smiles={code: ["CCO"] for code in meds},
        relations=pd.DataFrame(
            {"drug_a": [meds[0]], "drug_b": [meds[1]], "relation": ["synergy"], "direction": ["both"]}
        ),
    )
    folder = cohort.save(tmp_path / "c")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from datamodules.cohort import Cohort; "
            "c = Cohort.load(sys.argv[2]); [c.save(sys.argv[2]) for _ in range(40)]",
            str(ROOT),
            str(folder),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    loads = 0
    try:
        while writer.poll() is None:
            loaded = Cohort.load(folder)
            # every file from one and the same save: none silently empty from a read across the swap
            assert loaded.summary() == cohort.summary()
            assert loaded.smiles == cohort.smiles and len(loaded.relations) == len(cohort.relations) > 0
            loads += 1
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and loads > 0


def test_unwritable_cache_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    from train import main

    (tmp_path / "file").write_text("not a folder")
    args = ["fit", f"--config={ROOT / 'configs' / 'lr.yaml'}", "--trainer.fast_dev_run=true"]
    with pytest.raises(SystemExit) as info:  # a file where the cache folder should be
        main(
            [
                *args,
                f"--data.init_args.cache_dir={tmp_path / 'file' / 'cache'}",
                "--data.init_args.synthetic_patients=50",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"medrec: error: {tmp_path / 'file' / 'cache'}: cannot write the cohort synthetic-" in err
    assert "Traceback" not in err

    def read_only(*args, **kwargs):  # as root, chmod cannot make a folder read-only: simulate it
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(SystemExit):
        main([*args, f"--data.init_args.cache_dir={tmp_path / 'ro'}", "--data.init_args.synthetic_patients=51"])
    assert f"medrec: error: {tmp_path / 'ro'}: cannot write the cohort synthetic-" in capsys.readouterr().err

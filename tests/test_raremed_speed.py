"""benchmarks/raremed_speed.py: RAREMed's batched fine-tuning step against one visit per step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import raremed_speed as speed  # noqa: E402
from benchmarks.provenance import read_markdown_header  # noqa: E402


def test_times_the_three_rows_and_writes_a_report_with_its_command(tiny_cohort_dir, tmp_path):
    out = tmp_path / "speed.md"
    argv = ["--data", str(tiny_cohort_dir), "--out", str(out), "--batches", "2", "--visits", "3",
            "--reference-visits", "1"]  # fmt: skip
    body = speed.main(argv)
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| medrec (config, batched)",
        "| one visit per step, config size",
        "| one visit per step, reference size",
    ]
    assert [r.split(" | ")[1] for r in rows] == ["2", "3", "1"]  # steps timed, the warm-up left out
    assert rows[0].endswith("| 1.0× |")
    header = read_markdown_header(out.read_text())
    assert header["Command"] == "python benchmarks/raremed_speed.py " + " ".join(argv)


def test_single_visits_cut_every_visit_once_in_order(tiny_datamodule):
    tiny_datamodule.setup("fit")
    batch = next(iter(tiny_datamodule.train_dataloader()))
    visits = speed.single_visits([batch], 10_000)
    assert len(visits) == int(batch["visit_mask"].sum())
    assert all(v["visit_mask"].shape == (1, 1) and bool(v["visit_mask"][0, 0]) for v in visits)
    b = int(batch["lengths"][0])
    assert visits[b - 1]["diagnoses"].equal(batch["diagnoses"][0:1, b - 1 : b])  # first patient's last visit


def test_refuses_counts_below_one_and_more_visits_than_the_batches_hold(tiny_cohort_dir, tmp_path):
    with pytest.raises(SystemExit):
        speed.main(["--data", str(tiny_cohort_dir), "--out", str(tmp_path / "x.md"), "--visits", "0"])
    with pytest.raises(SystemExit, match="fewer than --visits"):
        speed.main(["--data", str(tiny_cohort_dir), "--out", str(tmp_path / "x.md"), "--batches", "1",
                    "--visits", "100000"])  # fmt: skip


def test_a_missing_data_folder_is_one_error_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "raremed_speed.py"),
            "--data",
            str(missing),
            "--out",
            str(tmp_path / "x.md"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"benchmarks/raremed_speed.py: error: data root {missing} does not exist"
    ]
    assert not (tmp_path / "x.md").exists()

"""benchmarks/paired_patients.py: per-patient Jaccard from checkpoints, paired against a reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import paired_patients  # noqa: E402
from datamodules.visit_sequence import VisitSequenceDataModule  # noqa: E402
from lightning_modules import LogisticRegression, Nearest  # noqa: E402


def saved(model, data, path) -> tuple[str, float]:
    """Fit briefly, save a checkpoint, and return it with the model's own full-test-set Jaccard."""
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(path)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    return str(path), result["test_all_jaccard"]


def test_patient_means_reproduce_the_test_loop_and_the_table_pairs_them(tiny_cohort_dir, tmp_path):
    data = VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=8)
    torch.manual_seed(0)
    lr_ckpt, lr_jaccard = saved(LogisticRegression(knowledge=data.knowledge, lr=0.01), data, tmp_path / "lr.ckpt")
    nn_ckpt, nn_jaccard = saved(Nearest(knowledge=data.knowledge), data, tmp_path / "nearest.ckpt")
    out = tmp_path / "paired.md"
    argv = ["--data", str(tiny_cohort_dir), "--out", str(out), "--method", "lr", lr_ckpt,
            "--method", "nearest", nn_ckpt, lr_ckpt]  # fmt: skip
    text = paired_patients.run(argv)
    assert out.read_text().startswith("Command: `python benchmarks/paired_patients.py --data")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert float(rows["lr"][3]) == pytest.approx(lr_jaccard, abs=1e-4)  # the test loop's own figure
    # nearest's two checkpoints are nearest and lr: its per-patient means are their average
    assert float(rows["nearest"][3]) == pytest.approx((nn_jaccard + lr_jaccard) / 2, abs=1e-4)
    assert float(rows["nearest"][4]) == pytest.approx(lr_jaccard - (nn_jaccard + lr_jaccard) / 2, abs=1e-4)


def test_a_method_without_checkpoints_or_an_unknown_reference_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        paired_patients.parse_args(["--data", "x", "--out", "y", "--method", "lr"])
    with pytest.raises(SystemExit):
        paired_patients.parse_args(["--data", "x", "--out", "y", "--method", "lr", "a.ckpt", "--reference", "gamenet"])


def test_a_missing_checkpoint_is_one_error_line_naming_it(tiny_cohort_dir, tmp_path):
    import subprocess

    missing = tmp_path / "gone.ckpt"
    argv = ["--data", str(tiny_cohort_dir), "--out", str(tmp_path / "p.md"), "--method", "lr", str(missing)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/paired_patients.py"), *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"benchmarks/paired_patients.py: error: {missing}: checkpoint file not found"
    assert not (tmp_path / "p.md").exists()

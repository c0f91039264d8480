"""The documented workflows do what README says: resume in the default layout, test/predict with a
checkpoint (class check, evaluation-time options apply, architecture conflicts refused), and what
a run prints (no warnings, one line per epoch off a terminal, a closing summary)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from callbacks.progress import EpochLines, MedRecProgressBar, progress_bar, shown_metrics
from train import main

ROOT = Path(__file__).resolve().parents[1]


def user_folder(tmp_path: Path) -> Path:
    """A folder laid out like a fresh clone for README's commands: train.py and configs/ in it."""
    folder = tmp_path / "medrec"
    folder.mkdir()
    (folder / "train.py").symlink_to(ROOT / "train.py")
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def readme_command(line: str) -> list[str]:
    """One of README's commands, checked to be there verbatim, as argv."""
    assert line in (ROOT / "README.md").read_text(), f"README no longer shows: {line}"
    words = line.split()
    assert words[0] == "python"
    return [sys.executable, *words[1:]]


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]


@pytest.mark.slow
def test_readme_fit_interrupted_then_resumed_with_ckpt_path_last(tmp_path):
    """README's default command, killed after three epochs, then README's resume command: the run
    continues in its own folder from epoch 4, metrics.csv keeps every epoch, nothing is warned."""
    folder = user_folder(tmp_path)
    fit = readme_command("python train.py fit --config configs/retain.yaml")
    process = subprocess.Popen(fit, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("epoch 3/40"):
            break
    process.send_signal(signal.SIGKILL)
    _, first_err = process.communicate()
    assert any(line.startswith("epoch 1/40") for line in seen), "".join(seen) + first_err
    assert not any("\r" in line for line in seen)
    assert warnings_in(first_err) == [], first_err
    assert (folder / "runs/retain/version_0/checkpoints/last.ckpt").is_file()
    done = torch.load(folder / "runs/retain/version_0/checkpoints/last.ckpt", weights_only=True)["epoch"] + 1

    resume = readme_command("python train.py fit --config configs/retain.yaml --ckpt_path last")
    result = subprocess.run(resume, cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"medrec: resuming runs/retain/version_0 after epoch {done}" in out
    assert f"epoch {done + 1}/40" in out and "epoch 1/40" not in out
    assert warnings_in(result.stderr) == [], result.stderr
    assert sorted(p.name for p in (folder / "runs/retain").iterdir()) == ["version_0"]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("medrec: fit done after ") and "best val_jaccard 0." in summary
    assert summary.endswith("run folder runs/retain/version_0")
    best = summary.split("best val_jaccard ")[1].split(": ")[1].split(";")[0]
    assert (folder / best).is_file()
    assert (folder / "runs/retain/version_0/config.yaml").is_file()
    metrics = pd.read_csv(folder / "runs/retain/version_0/metrics.csv")
    epochs = set(metrics.dropna(subset=["val_jaccard"])["epoch"].astype(int))
    assert set(range(done)) <= epochs and max(epochs) >= done, "the resumed run lost the first epochs' metrics"
    assert metrics["train_loss_epoch"].notna().sum() >= done + 1, "the training loss is logged every epoch"

    # README's `test --config configs/<method>.yaml --ckpt_path best`, for this method
    readme_command("python train.py test     --config configs/<method>.yaml --ckpt_path best")
    test = [sys.executable, "train.py", "test", "--config", "configs/retain.yaml", "--ckpt_path", "best"]
    result = subprocess.run(test, cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"medrec: test: {best}" in result.stdout and "test_jaccard" in result.stdout
    assert warnings_in(result.stderr) == [], result.stderr


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medrec: error: "), err
    return err[0]


def common(tiny_cohort_dir, config="lr.yaml") -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / config),
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def test_nothing_to_resume_is_an_error_not_a_fresh_start(tiny_cohort_dir, in_tmp, capsys):
    line = error_of(capsys, "fit", *common(tiny_cohort_dir), "--trainer.max_epochs=1", "--ckpt_path=last")
    assert "--ckpt_path last" in line and "runs/lr/*/checkpoints/last.ckpt" in line
    assert not (in_tmp / "runs").exists()
    line = error_of(capsys, "fit", *common(tiny_cohort_dir), "--checkpoint.dirpath=ck", "--ckpt_path=last")
    assert "ck/last.ckpt does not exist" in line
    assert "no such checkpoint file" in error_of(capsys, "test", *common(tiny_cohort_dir), "--ckpt_path=nope.ckpt")


def test_resume_picks_the_latest_run_and_a_named_run_folder(tiny_cohort_dir, in_tmp, capsys):
    args = [*common(tiny_cohort_dir), "--model.init_args.lr=1e-2"]
    main(["fit", *args, "--trainer.max_epochs=1"])
    main(["fit", *args, "--trainer.max_epochs=1"])
    capsys.readouterr()
    main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert "resuming runs/lr/version_1 after epoch 1" in capsys.readouterr().out
    assert torch.load("runs/lr/version_1/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load("runs/lr/version_0/checkpoints/last.ckpt", weights_only=True)["epoch"] == 0
    main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=runs/lr/version_0"])
    assert "resuming runs/lr/version_0 after epoch 1" in capsys.readouterr().out
    assert torch.load("runs/lr/version_0/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in Path("runs/lr").iterdir()) == ["version_0", "version_1"]


@pytest.fixture()
def trained_lr(tiny_cohort_dir, in_tmp, capsys):
    main(["fit", *common(tiny_cohort_dir), "--trainer.max_epochs=2", "--model.init_args.lr=1e-2"])
    capsys.readouterr()
    return in_tmp / "runs/lr/version_0/checkpoints/last.ckpt"


def test_checkpoint_of_another_model_is_refused(tiny_cohort_dir, trained_lr, capsys):
    line = error_of(capsys, "test", *common(tiny_cohort_dir, "retain.yaml"), f"--ckpt_path={trained_lr}")
    assert "a LogisticRegression checkpoint" in line and "RETAIN" in line


def test_without_a_checkpoint_test_and_predict_refuse(tiny_cohort_dir, in_tmp, capsys):
    for command in ("test", "validate", "predict"):
        assert "needs --ckpt_path" in error_of(capsys, command, *common(tiny_cohort_dir))


def test_truncated_or_foreign_checkpoint_is_one_line(tiny_cohort_dir, trained_lr, capsys):
    broken = trained_lr.parent / "broken.ckpt"
    broken.write_bytes(trained_lr.read_bytes()[:1000])
    assert "not a readable checkpoint" in error_of(capsys, "test", *common(tiny_cohort_dir), f"--ckpt_path={broken}")
    text = trained_lr.parent / "notes.ckpt"
    text.write_text("hello")
    assert "not a readable checkpoint" in error_of(capsys, "test", *common(tiny_cohort_dir), f"--ckpt_path={text}")


def test_evaluation_options_apply_at_test_and_architecture_conflicts_are_refused(tiny_cohort_dir, trained_lr, capsys):
    args = [*common(tiny_cohort_dir), "--ckpt_path=best"]
    plain = main(["test", *args]) or capsys.readouterr().out
    strict = main(["test", *args, "--model.init_args.threshold=0.9"]) or capsys.readouterr().out

    def figure(out: str, key: str) -> float:
        return float(next(line.split()[-1] for line in out.splitlines() if line.split()[:1] == [key]))

    assert figure(strict, "test_avg_drugs") < figure(plain, "test_avg_drugs")
    assert "medrec: test: runs/lr/version_0/checkpoints/best-" in plain
    line = error_of(capsys, "test", *args, "--model.init_args.lr=0.5")
    assert "--model.init_args.lr=0.5 (checkpoint: 0.01)" in line and "threshold" in line
    # the same value as the checkpoint's is no conflict
    main(["validate", *args, "--model.init_args.lr=1e-2"])


def test_print_config_shows_the_settings_in_use(tiny_cohort_dir, trained_lr, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options = ["--ckpt_path=last", "--model.init_args.threshold=0.7", "--print_config"]
        main(["test", *common(tiny_cohort_dir), *options])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "threshold: 0.7" in out and "lr: 0.01" in out  # lr from the checkpoint, not the config's
    assert f"ckpt_path: {Path('runs/lr/version_0/checkpoints/last.ckpt')}" in out


@pytest.mark.usefixtures("single_intra_op_thread")
def test_readme_dpr_heuristic_predict_applies(tiny_cohort_dir, in_tmp, capsys):
    """README: ``predict --config configs/dpr_wg.yaml --ckpt_path … --model.init_args.generation=heuristic``."""
    readme = (ROOT / "README.md").read_text()
    assert "--model.init_args.generation=heuristic --predict_output.path recs.jsonl" in readme
    args = [*common(tiny_cohort_dir, "dpr_wg.yaml"), "--model.init_args.pretrain_epochs=1"]
    main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    ckpt = "runs/dpr_wg/version_0/checkpoints/last.ckpt"
    main(["predict", *args, f"--ckpt_path={ckpt}", "--predict_output.path", "plain.jsonl"])
    heuristic = ["--model.init_args.generation=heuristic", "--predict_output.path", "h.jsonl"]
    main(["predict", *args, f"--ckpt_path={ckpt}", *heuristic])
    plain = [json.loads(line) for line in Path("plain.jsonl").read_text().splitlines()]
    heuristic = [json.loads(line) for line in Path("h.jsonl").read_text().splitlines()]
    assert len(plain) == len(heuristic) > 0
    assert "source" not in plain[0] and {"source", "candidate_drugs"} <= set(heuristic[0])


def test_progress_shows_loss_and_controller_state(tiny_cohort_dir, in_tmp, capsys):
    shown = {}
    for config, labels in [
        ("safedrug.yaml", {"loss", "β", "ddi", "val_jaccard"}),
        ("gamenet.yaml", {"loss", "T", "ddi_steps"}),
        ("miranda.yaml", {"loss", "therapeutic"}),
    ]:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / config),
                f"--data.init_args.root={tiny_cohort_dir}",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1",
            ]
        )
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
        shown[config] = line
        assert all(f"  {label} " in line for label in labels), line
        assert "val_metrics" not in out, "the model summary lists metric modules"
        assert out.strip().splitlines()[-1].startswith("medrec: fit done after 1 epoch(s) (max_epochs=1)")
    assert "(best " in shown["safedrug.yaml"]


def test_progress_bar_kind_follows_the_output_stream():
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert isinstance(progress_bar(Stream(True)), MedRecProgressBar)
    assert isinstance(progress_bar(Stream(False)), EpochLines)


def test_bar_metrics_drop_version_and_show_controller_state():
    class Trainer:
        callback_metrics = {
            "train_loss_step": torch.tensor(0.25),
            "pid_beta_step": torch.tensor(0.5),
            "val_jaccard": torch.tensor(0.41234),
        }

    assert shown_metrics(Trainer()) == {"loss": "0.25", "val_jaccard": "0.4123", "β": "0.5"}


def test_fit_prints_no_warning_in_a_subprocess(tiny_cohort_dir, tmp_path):
    folder = user_folder(tmp_path)
    command = ["train.py", "fit", "--config", "configs/gamenet.yaml", f"--data.init_args.root={tiny_cohort_dir}"]
    result = subprocess.run(
        [sys.executable, *command, "--trainer.max_epochs=2"], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert warnings_in(result.stderr) == [] and warnings_in(result.stdout) == [], result.stderr
    assert "litlogger" not in result.stdout + result.stderr
    assert json.dumps(result.stdout.splitlines()[-1]).startswith('"medrec: fit done after 2 epoch(s)')


@pytest.mark.slow
@pytest.mark.parametrize("config", ["gamenet.yaml", "safedrug.yaml"])
def test_ddp_fit_prints_no_sync_dist_warning(config, tiny_cohort_dir, tmp_path):
    """Epoch-level figures (epoch seconds, GAMENet's temperature and DDI-step share, SafeDrug's β,
    the loss means) are reduced over ranks, so Lightning has nothing to warn about under DDP."""
    folder = user_folder(tmp_path)
    command = ["train.py", "fit", "--config", f"configs/{config}", f"--data.init_args.root={tiny_cohort_dir}"]
    command += ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    command += ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    result = subprocess.run([sys.executable, *command], cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings_in(result.stderr) == [], result.stderr
    assert result.stdout.count("medrec: fit done after 2 epoch(s)") == 1  # rank 0 only


def test_a_non_finite_loss_stops_the_fit_with_one_line(tiny_cohort_dir, in_tmp, capsys, monkeypatch):
    from lightning_modules import RETAIN

    original, calls = RETAIN.compute_loss, []

    def diverging(self, logits, batch):
        out = original(self, logits, batch)
        calls.append(1)
        if len(calls) == 2:  # the second training batch
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(RETAIN, "compute_loss", diverging)
    line = error_of(capsys, "fit", *common(tiny_cohort_dir, "retain.yaml"), "--trainer.max_epochs=2")
    assert "RETAIN: the training loss of epoch 0, batch 1 is not finite" in line
    assert not list(Path("runs").glob("retain/*/checkpoints/*.ckpt")), "NaN weights were checkpointed"

"""train.py end to end: every config runs, overrides work, bad input fails with one clear line."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_cohort

from train import main, make_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def run_cli(*args: str) -> None:
    main(list(args))


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fast_dev_run(command: str, config: str, root: Path, *extra: str) -> None:
    run_cli(
        command,
        "--config",
        str(ROOT / "configs" / config),
        f"--data.init_args.root={root}",
        "--trainer.fast_dev_run=true",
        *extra,
    )


def _model_classes() -> set[type]:
    from lightning_modules.base import MedRecModule

    found, todo = set(), [MedRecModule]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.fixture()
def default_device_meta(monkeypatch):
    """Runs every model's forward, loss and probabilities with torch's default device set to
    ``meta``: a tensor created there without naming a device (which on a GPU run would land on
    the CPU) is a meta tensor and fails on first use beside the model's CPU tensors. It cannot
    see tensors made outside those methods (training-step bodies, callbacks, collate), CUDA
    kernels missing for an op, or host syncs (``.item()``)."""

    def on_meta(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            with torch.device("meta"):
                return method(*args, **kwargs)

        return wrapper

    for cls in _model_classes():
        for name in ("forward", "compute_loss", "predict_probabilities"):
            if name in vars(cls):
                monkeypatch.setattr(cls, name, on_meta(vars(cls)[name]))
    return on_meta


# Per config, beyond the config itself: DPR-WG also predicts by its heuristic generation.
STAGE_EXTRA = {"dpr_wg.yaml": [[], ["--model.init_args.generation=heuristic"]]}


def visit_count(cli) -> int:
    """Visits of the test split, the rows a prediction file must hold."""
    return sum(len(ids) for batch in cli.datamodule.predict_dataloader() for ids in batch["visit_ids"])


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs_fit_test_predict(config, tiny_cohort_dir, in_tmp, default_device_meta):
    """fit (2 training batches, 1 validation batch) → test → predict from its last checkpoint, through train.py,
    with the device probe on: each stage's model code runs on every config, MiranDa's test end and DPR's
    heuristic generation included."""
    common = [
        "--config",
        str(ROOT / "configs" / config),
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    fit = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--checkpoint.dirpath=ckpt",
    ]
    make_cli(["fit", *common, *fit])
    assert (in_tmp / "ckpt" / "last.ckpt").is_file()
    tested = make_cli(["test", *common, "--ckpt_path=ckpt/last.ckpt"])
    figures = tested.trainer.callback_metrics
    assert {"test_jaccard", "test_f1", "test_ddi_rate"} <= set(figures), sorted(figures)
    assert 0.0 <= float(figures["test_jaccard"]) <= 1.0
    if config == "miranda.yaml":  # the ELOS figures of its test end
        assert "test_elos" in figures, sorted(figures)
    for i, extra in enumerate(STAGE_EXTRA.get(config, [[]])):
        out = in_tmp / f"recs{i}.jsonl"
        predicted = make_cli(["predict", *common, "--ckpt_path=ckpt/last.ckpt", f"--predict_output.path={out}", *extra])
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == visit_count(predicted), (extra, len(records))
        assert len({r["visit_id"] for r in records}) == len(records)
        if "--model.init_args.generation=heuristic" in extra:  # the heuristic's records say where a package came from
            assert all(r["source"] in ("S1", "S2", "S3") for r in records), records[0]


def test_the_default_device_probe_catches_a_tensor_made_without_a_device(default_device_meta):
    fixed = default_device_meta(lambda x: torch.zeros(2, device=x.device) + x)
    buggy = default_device_meta(lambda x: torch.zeros(2) + x)
    assert fixed(torch.ones(2)).tolist() == [1.0, 1.0]
    with pytest.raises((RuntimeError, NotImplementedError)):
        buggy(torch.ones(2)).tolist()


def test_fit_test_predict_with_checkpoint(tiny_cohort_dir, in_tmp, capsys):
    config = str(ROOT / "configs" / "lr.yaml")
    common = ["--config", config, f"--data.init_args.root={tiny_cohort_dir}", "--trainer.enable_progress_bar=false"]
    run_cli("fit", *common, "--trainer.max_epochs=2", "--checkpoint.dirpath=ckpt", "--model.init_args.lr=1e-2")
    assert (in_tmp / "ckpt" / "last.ckpt").is_file()
    assert list((in_tmp / "runs" / "lr").glob("version_*/metrics.csv"))
    run_cli("test", *common, "--ckpt_path=ckpt/last.ckpt")
    out = capsys.readouterr().out
    assert "test_jaccard" in out and "test_jaccard_std" in out
    run_cli("predict", *common, "--ckpt_path=ckpt/last.ckpt")


@pytest.mark.parametrize("config", ["ncf.yaml", "dpr_nn.yaml", "dpr_wg.yaml"])
def test_package_recommenders_predict_through_the_cli(config, tiny_cohort_dir, in_tmp):
    # CLI-built models keep only their own __init__ arguments in hparams (no `threshold`)
    fast_dev_run("predict", config, tiny_cohort_dir, "--predict_output.path=recs.jsonl")
    records = [json.loads(line) for line in (in_tmp / "recs.jsonl").read_text().splitlines()]
    assert records and all(r["visit_id"] and len(r["drugs"]) == len(r["probabilities"]) for r in records)
    assert any(r["drugs"] for r in records)


def test_print_config_shows_resolved_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            "fit", "--config", str(ROOT / "configs" / "retain.yaml"), "--model.init_args.lr=0.003", "--print_config"
        )
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_modules.RETAIN" in out
    assert "lr: 0.003" in out
    assert "monitor: val_jaccard" in out
    assert "knowledge" not in out  # linked from the data, not a config option


def test_unknown_config_key_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(ROOT / "configs" / "retain.yaml"), "--model.init_args.embedding_dimm=3")
    assert exit_info.value.code != 0
    assert "embedding_dimm" in capsys.readouterr().err


def cli_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True)


def test_bad_data_root_is_one_clear_line(in_tmp):
    result = cli_subprocess(
        "fit", "--config", str(ROOT / "configs" / "lr.yaml"), "--data.init_args.root=/no/such/folder", cwd=in_tmp
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "medrec: error: data root /no/such/folder does not exist"
    assert "Traceback" not in result.stderr


def test_checkpoint_from_other_vocabulary_is_refused(tiny_cohort_dir, in_tmp):
    config = str(ROOT / "configs" / "lr.yaml")
    run_cli(
        "fit",
        "--config",
        config,
        f"--data.init_args.root={tiny_cohort_dir}",
        "--trainer.max_epochs=1",
        "--checkpoint.dirpath=ckpt",
        "--trainer.enable_progress_bar=false",
    )
    other = write_cohort(in_tmp / "other", n_patients=12)
    result = cli_subprocess(
        "test", "--config", config, f"--data.init_args.root={other}", "--ckpt_path=ckpt/last.ckpt", cwd=in_tmp
    )
    assert result.returncode == 2
    assert "was trained on a different diagnosis vocabulary" in result.stderr.strip().splitlines()[-1]

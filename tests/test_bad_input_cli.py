"""Hardening (issue 23), "every option validated" and "one error line": each bad option or
checkpoint stops train.py / medrec-prepare / benchmarks/run.py before any work, with exactly one
``<prog>: error: ...`` line naming the option or file, and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import write_cohort

from datamodules.errors import MedRecError, OptionError, causes, option_error_line
from train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cli") / "cohort")


def one_error_line(capsys, prog: str = "medrec") -> str:
    """The single ``prog: error:`` line on stderr (no traceback, no usage text)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    return one_error_line(capsys)


def fit_args(cohort, *extra: str) -> list[str]:
    return [
        "fit",
        f"--config={ROOT / 'configs' / 'retain.yaml'}",
        f"--data.init_args.root={cohort}",
        "--trainer.fast_dev_run=true",
        "--trainer.logger=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.init_args.lr=-1", "option --model.init_args.lr: Not of type PositiveFloat: -1"),
        ("--model.init_args.lr=0", "option --model.init_args.lr: Not of type PositiveFloat: 0"),
        ("--data.init_args.batch_size=-3", "option --data.init_args.batch_size: Not of type PositiveInt: -3"),
        ("--data.init_args.eval_batch_size=0", "option --data.init_args.eval_batch_size"),
        ("--model.init_args.dropout=2", "option --model.init_args.dropout: Not of type DropoutRate: 2"),
        ("--model.init_args.dropout=1", "option --model.init_args.dropout: Not of type DropoutRate: 1"),
        ("--model.init_args.threshold=2", "option --model.init_args.threshold: Not of type Probability: 2"),
        ("--model.init_args.threshold=0", "option --model.init_args.threshold: Not of type Probability: 0"),
        ("--data.init_args.max_visits=0", "option --data.init_args.max_visits = 0"),
        ("--data.init_args.min_visits=0", "option --data.init_args.min_visits: Not of type PositiveInt: 0"),
        ("--data.init_args.synthetic_options=notadict", "option --data.init_args.synthetic_options = notadict"),
        ("--model.init_args.embedding_dim=0", "option --model.init_args.embedding_dim"),
        ("--model.init_args.weight_decay=-0.1", "option --model.init_args.weight_decay"),
        ("--trainer.max_epochs=x", "option --trainer.max_epochs = x"),
    ],
)
def test_out_of_range_option_is_one_line_naming_it(cohort, capsys, option, message):
    line = fails(capsys, *fit_args(cohort, option))
    assert line.startswith(f"medrec: error: {message}"), line


@pytest.mark.parametrize(
    "option, message",
    [
        # inherited from VisitSequenceDataModule: the same range types, not plain ints
        ("--data.init_args.batch_size=0", "option --data.init_args.batch_size: Not of type PositiveInt: 0"),
        ("--data.init_args.similar_patients=0", "option --data.init_args.similar_patients: Not of type PositiveInt"),
        ("--data.init_args.negative_packages=-1", "option --data.init_args.negative_packages: Not of type"),
    ],
)
def test_package_data_options_are_range_checked(capsys, option, message):
    line = fails(capsys, "fit", f"--config={ROOT / 'configs' / 'dpr_wg.yaml'}", "--trainer.fast_dev_run=true", option)
    assert line.startswith(f"medrec: error: {message}"), line


def test_split_ratios_not_summing_to_one(cohort, capsys):
    line = fails(capsys, *fit_args(cohort, "--data.init_args.split=random", "--data.init_args.split_ratios=[.9,.9,.1]"))
    assert line == (
        "medrec: error: split_ratios must be three non-negative numbers summing to 1, got [0.9, 0.9, 0.1] (sum 1.9)"
    )


def test_unknown_synthetic_option(cohort, capsys):
    line = fails(
        capsys, "fit", f"--config={ROOT / 'configs' / 'lr.yaml'}", "--data.init_args.synthetic_options={bogus: 1}"
    )
    assert line.startswith("medrec: error: unknown synthetic_options ['bogus']; known: ")


def test_non_integer_synthetic_option(cohort, capsys):
    line = fails(
        capsys, "fit", f"--config={ROOT / 'configs' / 'lr.yaml'}", "--data.init_args.synthetic_options={regimens: 1.5}"
    )
    assert line == "medrec: error: synthetic_options.regimens must be an integer, got 1.5"


def test_unknown_model_option(cohort, capsys):
    line = fails(capsys, *fit_args(cohort, "--model.init_args.lrr=1"))
    assert line == "medrec: error: option --model.init_args: Option 'lrr' is not accepted"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such checkpoint file"),
        (b"just text\n", "not a readable checkpoint (damaged or not a checkpoint"),
        (b"PK\x03\x04 truncated zip", "not a readable checkpoint (damaged or not a checkpoint"),
    ],
    ids=["missing", "text", "truncated"],
)
def test_bad_ckpt_path_is_one_line_naming_the_file(cohort, tmp_path, capsys, content, message):
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    for command in ("fit", "test"):
        args = fit_args(cohort, f"--ckpt_path={path}")
        args[0] = command
        line = fails(capsys, *args)
        assert line.startswith(f"medrec: error: --ckpt_path {path}: {message}"), line


def test_crafted_ckpt_path_does_not_run_its_payload(cohort, tmp_path, capsys):
    import os

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"state_dict": {}, "hyper_parameters": {"lr": Payload()}}, tmp_path / "crafted.ckpt")
    line = fails(capsys, *fit_args(cohort, f"--ckpt_path={tmp_path / 'crafted.ckpt'}"))
    assert line.startswith(
        f"medrec: error: --ckpt_path {tmp_path / 'crafted.ckpt'}: not a readable checkpoint: refused"
    )
    assert not (tmp_path / "ran").exists()


def test_data_error_is_one_line(tmp_path, capsys):
    line = fails(capsys, *fit_args(tmp_path / "nowhere"))
    assert line == f"medrec: error: data root {tmp_path / 'nowhere'} does not exist"


def test_debug_switch_shows_the_traceback(cohort, monkeypatch):
    monkeypatch.setenv("MEDREC_DEBUG", "1")
    with pytest.raises(ValueError) as info:  # the exception itself, not SystemExit: Python prints its traceback
        main(fit_args(cohort, "--data.init_args.split_ratios=[.9,.9,.1]"))
    assert any(isinstance(e, OptionError) and "split_ratios must be three" in str(e) for e in causes(info.value))


def test_python_callers_get_the_same_checks():
    from datamodules.visit_sequence import VisitSequenceDataModule
    from lightning_modules.retain import RETAIN

    with pytest.raises(OptionError, match="max_visits must be >= 1"):
        VisitSequenceDataModule(max_visits=0)
    with pytest.raises(OptionError, match="batch_size must be >= 1, got 0"):
        VisitSequenceDataModule(batch_size=0)
    knowledge = VisitSequenceDataModule(synthetic_patients=60).knowledge
    with pytest.raises(MedRecError, match=r"threshold must lie in \(0, 1\], got 2"):
        RETAIN(knowledge=knowledge, threshold=2)
    with pytest.raises(OptionError, match=r"lr must lie in \(0, inf\], got -1"):
        RETAIN(knowledge=knowledge, lr=-1)


def test_option_error_line_of_a_plain_message():
    assert option_error_line("unrecognized arguments: --nonsense") == "unrecognized arguments: --nonsense"


# --- medrec-prepare and benchmarks/run.py ------------------------------------------------
def test_medrec_prepare_bad_option_is_one_line(tmp_path, capsys):
    from datamodules.mimic.cli import main as prepare_main

    with pytest.raises(SystemExit) as info:
        prepare_main([str(tmp_path), "--min_admissions", "0"])
    assert info.value.code == 2
    assert one_error_line(capsys, "medrec-prepare") == "medrec-prepare: error: min_admissions must be >= 1, got 0"
    with pytest.raises(SystemExit) as info:
        prepare_main([str(tmp_path), "--source", "mimic9"])
    assert info.value.code == 2
    assert one_error_line(capsys, "medrec-prepare").startswith("medrec-prepare: error: option --source")


def test_benchmark_run_bad_option_is_one_line(cohort, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run import main as run_main
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    config = str(ROOT / "configs" / "lr.yaml")
    with pytest.raises(SystemExit) as info:
        run_main(["--config", config, "--data", str(cohort), "--out", str(tmp_path), "--model.init_args.lr=-1"])
    assert info.value.code == 2
    line = one_error_line(capsys, "benchmarks/run.py")
    assert line.startswith("benchmarks/run.py: error: option --model.init_args.lr: Not of type PositiveFloat")


def test_ckpt_path_naming_a_module_outside_medrec_is_refused(cohort, tmp_path, capsys):
    import sys

    import torch

    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "antigravity.Fly"}}, tmp_path / "x.ckpt")
    line = fails(capsys, *fit_args(cohort, f"--ckpt_path={tmp_path / 'x.ckpt'}"))
    assert line == (
        f"medrec: error: --ckpt_path {tmp_path / 'x.ckpt'}: names model class 'antigravity.Fly', "
        "which is not a medrec model"
    )
    assert "antigravity" not in sys.modules  # never imported (importing it runs code)


@pytest.mark.parametrize(
    "config, option, message",
    [
        ("miranda.yaml", "--model.init_args.heads=3", "--model lightning_modules.MiranDa: embedding_dim (64) must be"),
        (
            "gamenet.yaml",
            "--model.init_args.margin_weight=2",
            "--model lightning_modules.GAMENet: margin_weight must lie",
        ),
    ],
)
def test_value_error_of_an_init_is_one_line_naming_the_class(cohort, capsys, config, option, message):
    args = fit_args(cohort, option)
    args[1] = f"--config={ROOT / 'configs' / config}"
    line = fails(capsys, *args)
    assert line.startswith(f"medrec: error: {message}"), line

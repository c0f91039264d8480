"""The DDI controller has one stable name through train.py: ``--ddi_controller.init_args.<setting>``
(config key ``ddi_controller:``); it takes effect, shows in --print_config and the run's config.yaml,
and the old place (a trainer callback) is refused naming the new one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from callbacks import DDIAnnealing, DDIController, PIDDDIController
from train import main, make_cli

ROOT = Path(__file__).resolve().parents[1]
SAFEDRUG = str(ROOT / "configs" / "safedrug.yaml")
GAMENET = str(ROOT / "configs" / "gamenet.yaml")
SMALL = ["--model.init_args.embedding_dim=8", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def controllers(cli) -> list[DDIController]:
    return [c for c in cli.trainer.callbacks if isinstance(c, DDIController)]


def test_the_option_reaches_the_one_controller_of_the_run(tiny_cohort_dir):
    for option in ("--ddi_controller.init_args.target_ddi=0.02", "--ddi_controller.target_ddi=0.02"):
        cli = make_cli(["--config", SAFEDRUG, f"--data.init_args.root={tiny_cohort_dir}", *SMALL, option], run=False)
        (pid,) = controllers(cli)
        assert type(pid) is PIDDDIController and (pid.target_ddi, pid.kp) == (0.02, 0.05)
    cli = make_cli(["--config", GAMENET, f"--data.init_args.root={tiny_cohort_dir}", *SMALL], run=False)
    (switch,) = controllers(cli)
    assert type(switch) is DDIAnnealing and (switch.target_ddi, switch.temperature) == (0.05, 0.5)
    cli = make_cli(
        ["--config", SAFEDRUG, f"--data.init_args.root={tiny_cohort_dir}", *SMALL, "--ddi_controller=null"], run=False
    )
    assert controllers(cli) == [] and cli.model.ddi_controller is None  # β = 1, no DDI control


def beta_trace(root, target: float, folder: Path) -> list[tuple[float, float]]:
    """(batch DDI rate, β) of every training step of a one-epoch SafeDrug fit at target ``target``."""
    cli = make_cli(
        [
            "--config",
            SAFEDRUG,
            f"--data.init_args.root={root}",
            *SMALL,
            "--trainer.max_epochs=1",
            f"--checkpoint.dirpath={folder / str(target)}",
            f"--ddi_controller.init_args.target_ddi={target}",
        ],
        run=False,
    )
    (pid,) = controllers(cli)
    trace = []
    step = pid.step
    pid.step = lambda rate: trace.append((rate, step(rate))) or trace[-1][1]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return trace


def test_the_target_steers_beta_in_a_fit(tiny_cohort_dir, tmp_path):
    low, high = beta_trace(tiny_cohort_dir, 0.0, tmp_path), beta_trace(tiny_cohort_dir, 1.0, tmp_path)
    assert len(low) == len(high) > 0
    # above the target β = 1 - (rate - γ) / Kp (Eq. 19); γ = 1 is never exceeded, so β stays 1
    assert any(rate > 0 for rate, _ in low)
    assert [beta for _, beta in low] == pytest.approx([max(0.0, 1 - rate / 0.05) for rate, _ in low])
    assert [beta for _, beta in high] == [1.0] * len(high)


def test_print_config_and_the_runs_config_yaml_hold_the_controller(tiny_cohort_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    option = "--ddi_controller.init_args.target_ddi=0.03"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SAFEDRUG, option, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["ddi_controller"]
    assert printed["class_path"] == "callbacks.PIDDDIController" and printed["init_args"]["target_ddi"] == 0.03
    main(
        [
            "fit",
            "--config",
            GAMENET,
            f"--data.init_args.root={tiny_cohort_dir}",
            "--model.init_args.embedding_dim=8",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1",
            "--ddi_controller.temperature=0.25",
        ]
    )
    (saved,) = tmp_path.glob("runs/gamenet/version_*/config.yaml")
    controller = yaml.safe_load(saved.read_text())["ddi_controller"]
    assert controller["class_path"] == "callbacks.DDIAnnealing"
    assert controller["init_args"] == {"target_ddi": 0.05, "temperature": 0.25, "decay": 0.85, "seed": 0}
    assert "DDIAnnealing" not in str(yaml.safe_load(saved.read_text())["trainer"]["callbacks"])


def test_the_wandb_config_names_the_controller_settings_as_sweeps_do():
    from callbacks.wandb_logging import flatten_config

    config = {"ddi_controller": {"class_path": "callbacks.PIDDDIController", "init_args": {"target_ddi": 0.04}}}
    assert flatten_config(config) == {
        "ddi_controller.class_path": "callbacks.PIDDDIController",
        "ddi_controller.init_args.target_ddi": 0.04,
    }
    sweeps = [yaml.safe_load((ROOT / "configs" / "sweeps" / f"{m}.yaml").read_text()) for m in ("safedrug", "gamenet")]
    assert all("ddi_controller.init_args.target_ddi" in sweep["parameters"] for sweep in sweeps)
    assert not any(name.startswith("trainer.callbacks") for sweep in sweeps for name in sweep["parameters"])


@pytest.mark.parametrize(
    "option", ["--trainer.callbacks.init_args.target_ddi=0.05", "--trainer.callbacks.init_args.temperature=0.2"]
)
def test_the_old_callback_option_is_refused_naming_the_new_one(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SAFEDRUG, option, "--print_config"])
    assert exit_info.value.code == 2
    name = option.split("=")[0].rsplit(".", 1)[-1]
    assert capsys.readouterr().err.strip() == (
        f"medrec: error: {option.split('=')[0]}: the DDI controller is no trainer callback; set it with "
        f"--ddi_controller.init_args.{name} (in a sweep file: parameter ddi_controller.init_args.{name})"
    )


def test_a_controller_among_the_trainer_callbacks_is_refused_naming_its_place(tmp_path, capsys):
    config = yaml.safe_load(Path(SAFEDRUG).read_text())
    controller = config.pop("ddi_controller")
    config["trainer"]["callbacks"].append(controller)  # where configs of earlier medrec put it
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    for args in (["--config", str(old)], ["--config", SAFEDRUG, "--trainer.callbacks+=callbacks.DDIAnnealing"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args, "--print_config"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith("medrec: error: trainer.callbacks: ")
            and "is a DDI controller; give it as the top-level" in err
        )
        assert "`ddi_controller:`" in err and "--ddi_controller=callbacks." in err

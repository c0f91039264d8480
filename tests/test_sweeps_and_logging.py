"""W&B sweep files run as `wandb agent` runs them; W&B runs are named, tagged and hold their config.

The offline runs are read back from their ``.wandb`` files (the records `wandb sync` uploads).
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BENCHMARK, needs_benchmark

from train import main, make_cli

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
WANDB_LOGGER = str(ROOT / "configs" / "logger" / "wandb.yaml")


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def sweep_config_files(sweep: dict) -> list[str]:
    command = sweep["command"]
    return [command[i + 1] for i, word in enumerate(command) if word == "--config"]


def sample(spec: dict, rng: random.Random):
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    low, high = spec["min"], spec["max"]
    distribution = spec.get("distribution", "uniform")
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution in ("int_uniform", "q_uniform") or isinstance(low, int) and isinstance(high, int):
        return rng.randint(int(low), int(high))
    return rng.uniform(low, high)


def wandb_records(run_dir: Path):
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (LevelDB log format:
    7-byte file header, 32 KiB blocks, records split in FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finish_wandb() -> None:
    """End the process's W&B run and its service: the service writes the run's ``.wandb`` file
    to the end only when it closes the run's stream, which ``wandb.finish()`` does not wait for."""
    import wandb

    wandb.finish()
    wandb.teardown()


def offline_run(save_dir: Path) -> dict:
    """Name, group, tags, config and summary of the one offline run under ``save_dir``."""
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    run = {"dir": run_dir, "config": {}, "summary": {}, "history": []}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags))
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            items = record.history.item
            run["history"].append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif kind == "summary":
            items = record.summary.update
            run["summary"].update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items})
    run["config"] = {k: v.get("value") if isinstance(v, dict) else v for k, v in run["config"].items()}
    return run


TUNABLE_METHODS = {"lr", "retain", "safedrug", "gamenet", "miranda", "ncf", "dpr_wg", "dpr_ag"}


def test_every_method_config_has_a_sweep():
    present = {p.stem for p in (ROOT / "configs").glob("*.yaml")} & TUNABLE_METHODS
    assert present <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_well_formed(path):
    sweep = load_sweep(path)
    assert sweep["program"] == "train.py"
    assert sweep["project"] == "medrec"
    # Ranked by the best validation score of a run (logged with every validation), not the last.
    assert sweep["metric"] == {"name": "best_val_jaccard", "goal": "maximize"}
    # The data is part of the sweep: a fixed, real cohort folder, never the synthetic default.
    assert sweep["parameters"]["data.init_args.root"]["value"]
    command = sweep["command"]
    assert command[:4] == ["${env}", "python", "${program}", "fit"] and command[-1] == "${args}"
    configs = sweep_config_files(sweep)
    assert configs[0] == f"configs/{path.stem}.yaml" or (ROOT / configs[0]).is_file()
    assert all((ROOT / c).is_file() for c in configs), configs
    assert "configs/logger/wandb.yaml" in configs


@needs_benchmark
def test_sweep_data_roots_name_the_benchmark_from_the_repository_root():
    """Agents run from the repository root; the files' default data is the shared benchmark."""
    roots = {path.stem: load_sweep(path)["parameters"]["data.init_args.root"]["value"] for path in SWEEPS}
    assert roots.pop("miranda") == "cohorts/mimic3"  # needs length of stay: a medrec-prepare cohort
    assert set(roots.values()) == {"../shared/data/mimic3-safedrug"}
    assert (ROOT / "../shared/data/mimic3-safedrug").resolve() == BENCHMARK.resolve()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_parameter_is_a_valid_override(path, capsys):
    """Each parameter, with a sampled value, passes the CLI parser of its config (no typo survives)."""
    sweep = load_sweep(path)
    rng = random.Random(0)
    args = []
    for name, spec in sweep["parameters"].items():
        args.append(f"--{name}={sample(spec, rng)}")
    configs = [a for c in sweep_config_files(sweep) if "logger" not in c for a in ("--config", str(ROOT / c))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    for name in sweep["parameters"]:
        assert name.split(".")[-1] + ":" in printed


def agent_command(sweep: dict, parameters: dict, monkeypatch) -> tuple[list[str], dict]:
    """The command line and environment ``wandb agent`` starts for one run of ``sweep``.

    Runs wandb's own ``Agent._command_run`` (macro expansion of ``command:``: ``${env}``,
    ``${interpreter}``, ``${program}``, ``${args}``; the sweep parameter file; WANDB_RUN_ID,
    WANDB_SWEEP_PARAM_PATH) and records what it would hand to the process it starts.
    """
    from wandb import wandb_agent

    started = {}

    class RecordedProcess:
        def __init__(self, command=None, env=None, **kwargs):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordedProcess)
    monkeypatch.setenv("WANDB_RUN_ID", "")  # restored afterwards: the agent sets it in os.environ
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command, agent._function, agent._in_jupyter = sweep["command"], None, False
    agent._run_processes, agent._forward_signals = {}, False
    run = {"run_id": "sweeprun1", "program": sweep["program"], "args": {k: {"value": v} for k, v in parameters.items()}}
    agent._command_run(run)
    return started["command"], started["env"]


AGENT_TEST = "test_sweep_run_as_the_agent_starts_it"


@pytest.fixture(scope="module")
def agent_runs(request, tiny_cohort_dir, tmp_path_factory):
    """One sampled run of each selected sweep file, started as `wandb agent` starts it (offline),
    two at a time (a 2-core machine): {sweep name: (parameters, command, process, save_dir)}.

    The sweep's data root is pointed at a tiny cohort and the run is cut to a few batches by
    extra fixed parameters, as a user would edit the file; everything else is the file's.
    """
    from concurrent.futures import ThreadPoolExecutor

    selected = {item.callspec.id for item in request.session.items if item.name.startswith(f"{AGENT_TEST}[")}
    jobs = {}
    for path in (p for p in SWEEPS if p.stem in selected):
        folder = tmp_path_factory.mktemp(f"sweep-{path.stem}")
        sweep, rng = load_sweep(path), random.Random(1)
        parameters = {name: sample(spec, rng) for name, spec in sweep["parameters"].items()}
        parameters.update(
            {
                "data.init_args.root": str(tiny_cohort_dir),
                "trainer.max_epochs": 2,
                "trainer.limit_train_batches": 2,
                "trainer.limit_val_batches": 2,
                "trainer.logger.init_args.save_dir": str(folder / "runs"),
            }
        )
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("WANDB_SWEEP_ID", "testsweep")
            monkeypatch.setenv("WANDB_MODE", "offline")
            monkeypatch.setenv("WANDB_DIR", str(folder))
            monkeypatch.setenv("OMP_NUM_THREADS", "1")
            monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            command, env = agent_command(sweep, parameters, monkeypatch)
        jobs[path.stem] = (parameters, command, env, folder / "runs")

    def start(job):
        parameters, command, env, save_dir = job
        done = subprocess.run(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        return parameters, command, done, save_dir

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(jobs, pool.map(start, jobs.values())))


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_run_as_the_agent_starts_it(path, agent_runs, tiny_cohort_dir):
    """Every sweep file's command, as `wandb agent` expands it, trains and logs a named run
    whose summary holds the sweep metric as the best validation score."""
    parameters, command, done, save_dir = agent_runs[path.stem]
    assert command[:3] == ["/usr/bin/env", "python", "train.py"]
    assert f"--data.init_args.root={tiny_cohort_dir}" in command
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("anonymous", "locked by", "Ignoring project"):
        assert noise not in done.stderr, done.stderr[-3000:]

    run = offline_run(save_dir)
    method = path.stem
    assert (run["name"], run["group"]) == (f"{method}-tiny-s42", f"{method}-tiny")
    assert run["tags"] == [method, "tiny", "seed:42"]
    for name, value in parameters.items():  # the sweep's names are the config's names
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert run["config"][name] == expected, name
    assert "config" not in run["config"]  # no YAML string
    # The sweep metric is in the summary and is the best validation Jaccard, not the last.
    jaccards = [h["val_jaccard"] for h in run["history"] if "val_jaccard" in h]
    assert len(jaccards) == 2
    assert run["summary"][load_sweep(path)["metric"]["name"]] == pytest.approx(max(jaccards))
    assert (run["dir"] / "files" / "medrec_config.yaml").is_file()


def test_best_validation_score_is_in_every_validation_record(tmp_path, monkeypatch):
    """A run stopped after any epoch already ranks by its best epoch (best_val_jaccard)."""
    pytest.importorskip("wandb")

    from callbacks.wandb_logging import MedRecWandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = MedRecWandbLogger(save_dir=str(tmp_path / "runs"))
    logger.track_best("val_ddi_rate", "min")
    for step, (jaccard, ddi) in enumerate([(0.30, 0.08), (0.50, 0.06), (0.40, 0.07)]):
        logger.log_metrics({"val_jaccard": jaccard, "val_ddi_rate": ddi, "epoch": step}, step=step)
    finish_wandb()  # a run killed here keeps what it logged
    run = offline_run(tmp_path / "runs")
    assert [h["best_val_jaccard"] for h in run["history"]] == [0.30, 0.50, 0.50]
    assert [h["best_val_ddi_rate"] for h in run["history"]] == [0.08, 0.06, 0.06]
    assert run["summary"]["best_val_jaccard"] == 0.50 and run["summary"]["val_jaccard"] == 0.40


def test_best_validation_score_of_a_resumed_fit_counts_the_checkpoints_best(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from callbacks.wandb_logging import MedRecWandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = MedRecWandbLogger(save_dir=str(tmp_path / "runs"))
    checkpoint = SimpleNamespace(monitor="val_jaccard", mode="max", best_model_score=None)
    trainer = SimpleNamespace(checkpoint_callback=checkpoint, early_stopping_callback=None)
    monkeypatch.setattr(MedRecWandbLogger, "experiment", SimpleNamespace(disabled=True))
    logger.describe_run(trainer, "data: {init_args: {root: somewhere}}", [])
    checkpoint.best_model_score = 0.45  # restored from the checkpoint a fit resumes from
    assert logger._with_best({"val_jaccard": 0.40})["best_val_jaccard"] == 0.45
    assert logger._with_best({"val_jaccard": 0.50})["best_val_jaccard"] == 0.50


def test_sweep_run_without_data_root_is_refused(tmp_path, monkeypatch, capsys):
    """Under `wandb agent` a run on the synthetic default stops with a one-line error."""
    pytest.importorskip("wandb")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SWEEP_ID", "testsweep")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = ["fit", "--config", str(ROOT / "configs" / "lr.yaml"), "--config", WANDB_LOGGER]
    args += ["--data.init_args.synthetic_patients=150", "--trainer.max_epochs=1"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        finish_wandb()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "medrec: error: W&B sweep testsweep run has no data root" in err
    assert "data.init_args.root" in err


def fit_offline(tmp_path, monkeypatch, root, *extra) -> dict:

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(name, raising=False)
    args = ["fit", "--config", str(ROOT / "configs" / "retain.yaml"), "--config", WANDB_LOGGER]
    args += [f"--data.init_args.root={root}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    args += ["--trainer.enable_progress_bar=false", "--seed_everything=7", *extra]
    try:
        main(args)
    finally:
        finish_wandb()
    return offline_run(tmp_path / "runs")


def test_wandb_run_is_named_by_method_data_and_seed(tiny_cohort_dir, tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    run = fit_offline(tmp_path, monkeypatch, tiny_cohort_dir, "--model.init_args.lr=0.0031")
    assert (run["name"], run["group"], run["tags"]) == ("retain-tiny-s7", "retain-tiny", ["retain", "tiny", "seed:7"])
    # The config as dotted keys (filterable in the W&B table), not one YAML string.
    assert run["config"]["model.init_args.lr"] == 0.0031
    assert run["config"]["data.init_args.root"] == str(tiny_cohort_dir)
    assert run["config"]["model.class_path"] == "lightning_modules.RETAIN"
    assert "config" not in run["config"]
    # The run keeps its own resolved config, which trains again as it is.
    saved_path = run["dir"] / "files" / "medrec_config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    assert saved["model"]["init_args"]["lr"] == 0.0031 and saved["seed_everything"] == 7
    assert "anonymous setting" not in capfd.readouterr().err
    # README: retrain from it, then test the new run's best checkpoint
    retrain = ["--config", str(saved_path), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    try:
        cli = make_cli(["fit", *retrain])
    finally:
        finish_wandb()
    assert cli.model.hparams.lr == 0.0031 and cli.datamodule.root == str(tiny_cohort_dir)
    try:
        tested = make_cli(["test", "--config", str(saved_path), "--ckpt_path", "best"])
    finally:
        finish_wandb()
    assert tested.config.test.ckpt_path == cli.trainer.checkpoint_callback.best_model_path
    assert "test_jaccard" in tested.trainer.callback_metrics


def test_user_set_name_group_and_tags_win(tiny_cohort_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    run = fit_offline(
        tmp_path,
        monkeypatch,
        tiny_cohort_dir,
        "--trainer.logger.init_args.name=mine",
        "--trainer.logger.init_args.group=trial",
        "--trainer.logger.init_args.tags=[a,b]",
    )
    assert (run["name"], run["group"], run["tags"]) == ("mine", "trial", ["a", "b"])


def test_run_identity_names_data_and_method():
    from callbacks.wandb_logging import data_name, method_name

    assert data_name({"data": {"init_args": {"root": None}}}) == "synthetic"
    assert data_name({"data": {"init_args": {"root": "../shared/data/mimic3-safedrug/"}}}) == "mimic3-safedrug"
    assert data_name({"data": {"init_args": {"root": "/data/physionet.org/files/mimiciii/1.4"}}}) == "mimiciii-1.4"
    model = {"model": {"class_path": "lightning_modules.SafeDrug"}}
    assert method_name(model, ["configs/safedrug_nomask.yaml", "configs/logger/wandb.yaml"]) == "safedrug_nomask"
    assert method_name(model, ["wandb/run-1/files/medrec_config.yaml"]) == "safedrug"


def test_wandb_logger_goes_offline_without_a_key(tiny_cohort_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    try:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "lr.yaml"),
                "--config",
                WANDB_LOGGER,
                f"--data.init_args.root={tiny_cohort_dir}",
                "--trainer.max_epochs=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger.init_args.save_dir=wb",
            ]
        )
    finally:
        finish_wandb()
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.rglob("*"))[:20]
    monkeypatch.delenv("WANDB_MODE")

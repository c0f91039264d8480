"""Weights & Biases logging for medrec runs and sweeps.

``MedRecWandbLogger`` (``configs/logger/wandb.yaml``):

- never blocks a run: offline when no API key is configured;
- names, groups and tags each run by method, data and seed (``safedrug-mimic3-safedrug-s42``,
  group ``safedrug-mimic3-safedrug``, tags ``[safedrug, mimic3-safedrug, seed:42]``) unless
  the user set them (logger arguments or ``WANDB_NAME`` / ``WANDB_RUN_GROUP`` / ``WANDB_TAGS``);
- logs the resolved LightningCLI config as flat dotted keys (``model.init_args.lr``), the
  same names a sweep's parameters use, and keeps the config file with the run
  (``medrec_config.yaml`` in the run's files) so a run can be retrained from it;
- logs ``best_<monitor>`` (the best validation score so far) with every validation result,
  so a run's summary ranks it by its best epoch even when it is stopped early or killed;
- refuses to tune on the synthetic cohort under a sweep agent unless asked to explicitly.
"""

from __future__ import annotations

import math
import netrc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from datamodules.cohort import CohortError

CONFIG_FILENAME = "medrec_config.yaml"


def wandb_credentials_present() -> bool:
    """An API key in the environment or in ~/.netrc (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def in_sweep() -> bool:
    """True in a process started by ``wandb agent`` (it exports the sweep id)."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"init_args": {"lr": 1e-3}}}`` -> ``{"model.init_args.lr": 1e-3}``.

    Lists (e.g. ``trainer.callbacks``) stay one value: their positions are not stable names.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def method_name(config: Mapping[str, Any], config_files: list[str]) -> str:
    """The method config's name (``configs/<method>.yaml``), else the model class in lower case.

    A saved run config (``medrec_config.yaml``, ``config.yaml``) does not name the method;
    the model class does (``lightning_modules.SafeDrug`` -> ``safedrug``).
    """
    for file in config_files:
        path = Path(file)
        if path.parent.name == "configs":
            return path.stem
    class_path = str((config.get("model") or {}).get("class_path") or "model")
    return class_path.rsplit(".", 1)[-1].lower()


def data_name(config: Mapping[str, Any]) -> str:
    """The cohort folder's name (``mimic3-safedrug``); ``synthetic`` for the built-in cohort.

    A versioned MIMIC folder (``.../mimiciii/1.4``) is named with its parent (``mimiciii-1.4``).
    """
    root = ((config.get("data") or {}).get("init_args") or {}).get("root")
    if not root:
        return "synthetic"
    path = Path(str(root)).expanduser()
    name = path.name or path.resolve().name
    if re.fullmatch(r"v?\d+(\.\d+)*", name) and path.parent.name:
        name = f"{path.parent.name}-{name}"
    return name


def seed_of(config: Mapping[str, Any]) -> int | None:
    """The run's seed: LightningCLI stores the one it used in ``seed_everything``."""
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or seed is None:
        seed = os.environ.get("PL_GLOBAL_SEED")
    try:
        return int(seed)
    except (TypeError, ValueError):
        return None


def run_identity(config: Mapping[str, Any], config_files: list[str]) -> dict[str, Any]:
    """Name, group and tags of a run from its method, data and seed."""
    method, data, seed = method_name(config, config_files), data_name(config), seed_of(config)
    suffix = "" if seed is None else f"-s{seed}"
    tags = [method, data] + ([] if seed is None else [f"seed:{seed}"])
    return {"name": f"{method}-{data}{suffix}", "group": f"{method}-{data}", "tags": tags}


def refuse_synthetic_sweep(config: Mapping[str, Any]) -> None:
    """A sweep run without a data root would tune on the synthetic cohort: stop it, loudly.

    ``data.init_args.source: synthetic`` in the sweep's parameters says it is meant.
    """
    data = (config.get("data") or {}).get("init_args") or {}
    if in_sweep() and not data.get("root") and data.get("source") != "synthetic":
        raise CohortError(
            f"W&B sweep {os.environ['WANDB_SWEEP_ID']} run has no data root and would tune on the "
            "synthetic cohort; set `data.init_args.root: {value: <cohort folder>}` in the sweep file's "
            "parameters (or `data.init_args.source: {value: synthetic}` to tune on synthetic data)"
        )


class MedRecWandbLogger(WandbLogger):
    """WandbLogger that names its runs, logs the config as dotted keys and tracks the best score.

    ``WANDB_MODE`` set by the user (``online``, ``offline``, ``disabled``) always wins; without it
    and without an API key the run is offline (said once) and can be uploaded with ``wandb sync``.
    ``best_metrics`` maps a logged metric to ``max`` or ``min``: each time it is logged,
    ``best_<metric>`` (the best value so far) is logged with it. The run's checkpoint and
    early-stopping monitors are added when the config is handed over (``describe_run``).
    """

    def __init__(
        self,
        project: str = "medrec",
        name: str | None = None,
        tags: list[str] | None = None,
        best_metrics: dict[str, str] | None = None,
        **kwargs,
    ):
        if "WANDB_MODE" not in os.environ and not wandb_credentials_present():
            os.environ["WANDB_MODE"] = "offline"
            rank_zero_info("medrec: no W&B API key configured; logging offline (upload later with `wandb sync`)")
        super().__init__(project=project, name=name, tags=tags or None, **kwargs)
        if self._save_dir:
            # wandb looks for a git repository from this folder and warns when it is missing;
            # and its service process (shared by the runs of one Python process) resolves a
            # relative folder from its own working directory, not the run's.
            os.makedirs(self._save_dir, exist_ok=True)
            self._wandb_init["dir"] = os.path.abspath(self._save_dir)
        # Lightning always passes `anonymous` (None unless set) and wandb >= 0.19 warns
        # "The anonymous setting has no effect" for any value given, None included.
        self._wandb_init.pop("anonymous", None)
        # A run started by `wandb agent` belongs to the sweep's project and entity; wandb
        # ignores (with a warning) the ones given to wandb.init. self._project still names the
        # local checkpoint folder.
        if in_sweep():
            self._wandb_init.pop("project", None)
            self._wandb_init.pop("entity", None)
        self._best_modes: dict[str, str] = dict(best_metrics or {"val_jaccard": "max"})
        self._best: dict[str, float] = {}
        self._checkpoint_of: dict[str, Any] = {}  # monitored metric -> its ModelCheckpoint

    # -- best validation score ------------------------------------------------------------
    def track_best(self, metric: str, mode: str) -> None:
        """Log ``best_<metric>`` (``mode`` ``max`` or ``min``) with every value of ``metric``."""
        if mode not in ("max", "min"):
            raise ValueError(f"best_metrics: mode of {metric!r} must be 'max' or 'min', not {mode!r}")
        self._best_modes.setdefault(metric, mode)

    def _with_best(self, metrics: Mapping[str, float]) -> dict[str, float]:
        metrics = dict(metrics)
        for name, mode in self._best_modes.items():
            if name not in metrics:
                continue
            value = float(metrics[name])
            if math.isnan(value):
                continue
            best = self._best.get(name)
            # A resumed fit starts with the checkpoint's best from before the interruption.
            restored = getattr(self._checkpoint_of.get(name), "best_model_score", None)
            for candidate in (value, None if restored is None else float(restored)):
                if candidate is not None and (
                    best is None or (candidate > best if mode == "max" else candidate < best)
                ):
                    best = candidate
            self._best[name] = best
            metrics.setdefault(f"best_{name}", best)
        return metrics

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(self._with_best(metrics), step)

    # -- run identity and config ----------------------------------------------------------
    @rank_zero_only
    def describe_run(self, trainer, config_yaml: str, config_files: list[str]) -> None:
        """Take the run's resolved config (rank 0, from train.py's config callback).

        Logs the config as dotted keys, stores it as ``medrec_config.yaml`` with the run, and
        tracks the best value of the checkpoint and early-stopping monitors. (The run's name,
        group and tags were set before it started: ``name_wandb_run``, called by train.py.)
        """
        import yaml

        config = yaml.safe_load(config_yaml) or {}
        refuse_synthetic_sweep(config)
        for callback in (trainer.checkpoint_callback, trainer.early_stopping_callback):
            if callback is not None and getattr(callback, "monitor", None) and getattr(callback, "mode", None):
                self.track_best(callback.monitor, callback.mode)
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and self._best_modes.get(checkpoint.monitor) == getattr(checkpoint, "mode", None):
            self._checkpoint_of[checkpoint.monitor] = checkpoint
        run = self.experiment
        if getattr(run, "disabled", False) or not hasattr(run, "config"):
            return
        flat = flatten_config(config)
        # A sweep run's config already holds its parameters under these very names (locked
        # by the agent); sending them again would only print "locked by 'sweep'" warnings.
        current = dict(run.config)
        self.log_hyperparams({k: v for k, v in flat.items() if k not in current or current[k] != v})
        if run.dir:
            path = Path(run.dir) / CONFIG_FILENAME
            path.write_text(config_yaml)
            run.save(str(path), base_path=run.dir, policy="now")


def name_wandb_run(logger_args, config: Mapping[str, Any], config_files: list[str]) -> None:
    """Fill the logger's unset ``name``, ``group`` and ``tags`` (``logger_args``: its init
    arguments, before it is built) from the run's method, data and seed; values the user gave,
    as arguments or as WANDB_NAME / WANDB_RUN_GROUP / WANDB_TAGS, are kept."""
    identity = run_identity(config, config_files)
    for key, variable in (("name", "WANDB_NAME"), ("group", "WANDB_RUN_GROUP"), ("tags", "WANDB_TAGS")):
        if not logger_args.get(key) and not os.environ.get(variable):
            logger_args[key] = identity[key]

"""medrec command line: ``python train.py fit|validate|test|predict --config configs/<method>.yaml``."""

from __future__ import annotations

import inspect
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import EarlyStopping, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from callbacks.ddi_control import CLI_GROUP as DDI_CONTROLLER
from callbacks.ddi_control import DDIController
from callbacks.progress import MedRecModelSummary, progress_bar
from callbacks.recommendation_writer import RecommendationWriter
from callbacks.run_checkpoint import RunCheckpoint
from callbacks.wandb_logging import MedRecWandbLogger, name_wandb_run
from datamodules.errors import CheckpointError, OptionError, run_reporting_errors
from lightning_modules.base import MedRecModule
from lightning_modules.checkpoints import RunLayout, import_class, read_checkpoint, resolve_checkpoint
from lightning_modules.recommend import MODEL_CLASS_KEY


class _DropAdverts(logging.Filter):
    NOISE = ("litlogger", "already configured with model summary")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in self.NOISE)


def quiet_lightning() -> None:
    """Silence what every run would print and no medrec user can act on: deprecations inside
    Lightning's own code (its pytree helper, its calls into jsonargparse), its advice to log more
    often than a small cohort has batches (medrec logs epoch means too), its advert."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())


def run_folder(trainer: L.Trainer, explicit_dirpath: bool = False) -> Path | None:
    """The folder of this fit: ``<save_dir>/<name>/<version>``, parent of the ``checkpoints/``
    ModelCheckpoint lays out there, or an explicit ``--checkpoint.dirpath`` itself."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.dirpath:
        return None
    folder = Path(callback.dirpath)
    return folder if explicit_dirpath or folder.name != "checkpoints" else folder.parent


class LoggedConfig(SaveConfigCallback):
    """Saves the resolved config.yaml in the run's own folder, beside its ``checkpoints/`` (Lightning
    puts it in the logger's log_dir, which W&B shares between runs), and sends it to the logger."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def on_fit_start(self, trainer, pl_module) -> None:
        # Written once ModelCheckpoint has resolved its folder (and checked that it is empty);
        # an evaluation of a run keeps the config the run was trained with.
        folder = run_folder(trainer, explicit_dirpath=self.config.checkpoint.get("dirpath") is not None)
        if trainer.is_global_zero and folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.config_filename
            self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=self.multifile)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_unset=False)
        # MedRecWandbLogger names the run and logs the config as dotted keys (callbacks/wandb_logging.py).
        describe_run = getattr(trainer.logger, "describe_run", None)
        if describe_run is not None:
            describe_run(trainer, text, [str(path) for path in self.config.get("config") or []])
        elif trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": text})


class MedRecCLI(LightningCLI):
    """LightningCLI with medrec's wiring: data knowledge -> model, checkpoint/early stop on val Jaccard."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--threads",
            type=PositiveInt | Literal["all"],
            default=1,
            help="CPU threads per process for torch's intra-op work: 1 (default; medrec's models are small and "
            "one thread is never far from the best, while torch's all-core default is 15-40x slower on a busy "
            "machine: benchmarks/cpu_threads.py), N, or 'all' (torch's default, every core)",
        )
        # Vocabulary sizes and knowledge matrices come from the data, never from the config.
        parser.link_arguments("data.knowledge", "model.init_args.knowledge", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")  # last.ckpt = the latest epoch
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(RecommendationWriter, "predict_output")
        # The run's DDI controller (SafeDrug's PID β, GAMENet's annealed switch) has a name of its own,
        # --ddi_controller.init_args.<setting>, for configs, sweeps and γ grids alike; in
        # trainer.callbacks `--trainer.callbacks.init_args.*` would reach whichever callback is last.
        parser.add_lightning_class_args(DDIController, DDI_CONTROLLER, subclass_mode=True, required=False)
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_jaccard",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{val_jaccard:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "early_stopping.monitor": "val_jaccard",
                "early_stopping.mode": "max",
                "early_stopping.patience": 10,
            }
        )

    # --- parsing: --print_config shows the config after the checkpoint's settings are applied ---
    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict) or (args is not None and not isinstance(args, list | tuple)):
            self._raw_args, self._print_config = [], []
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            return refuse_controller_in_callbacks(self.config[subcommand] if subcommand else self.config)
        raw = list(sys.argv[1:] if args is None else args)
        self._print_config = [a for a in raw if a == "--print_config" or a.startswith("--print_config=")]
        self._raw_args = [a for a in raw if a not in self._print_config]
        refuse_controller_options_in_callbacks(self._raw_args)
        self.config = parser.parse_args(self._raw_args)
        subcommand = self.config.get("subcommand")
        refuse_controller_in_callbacks(self.config[subcommand] if subcommand else self.config)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (file, run folder, ``last``, ``best``), check it holds the config's
        model, and take the model's settings from it (replaces LightningCLI's silent override)."""
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") is None:
            if subcommand != "fit" and not config.trainer.get("fast_dev_run") and not self._print_config:
                raise OptionError(
                    f"{subcommand} needs --ckpt_path: a checkpoint file, a run folder, or `last` / `best` "
                    "(of this config's latest fit)"
                )
        else:
            layout = RunLayout.from_config(config)
            resolved = resolve_checkpoint(config.ckpt_path, layout)
            checkpoint = read_checkpoint(resolved.path)
            config.ckpt_path = str(resolved.path)
            self._apply_checkpoint_settings(subcommand, config, checkpoint, resolved.path)
            config = self.config[subcommand]  # parse_object returned a new namespace
            if subcommand != "fit":  # ModelCheckpoint's state is irrelevant to an evaluation
                warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
            if resolved.run is not None and config.trainer.get("logger") not in (None, True):
                # continue the run's own folder: a resumed fit keeps logging and checkpointing there,
                # test/validate/predict metrics and predictions land beside the model they evaluate
                config["trainer.logger.init_args.version"] = resolved.run.name
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            done = int(checkpoint.get("epoch", -1)) + 1
            what = f"resuming {resolved.run or resolved.path} after epoch {done}" if subcommand == "fit" else subcommand
            say(f"medrec: {what}: {resolved.path}")
        if self._print_config:
            skip_null = any("skip_null" in flag for flag in self._print_config)
            print(self._parser(subcommand).dump(config, skip_unset=skip_null, skip_validation=True), end="")
            raise SystemExit(0)

    def _explicit_model_options(self) -> set[str]:
        """Model init arguments named on the command line (not those coming from config files)."""
        names = set()
        for token in self._raw_args:
            if token.startswith("--model."):
                key = token[2:].split("=", 1)[0].split(".")[1:]
                key = key[1:] if key[:1] == ["init_args"] else key
                if key and key[0] not in ("class_path", "help", "dict_kwargs"):
                    names.add(key[0])
        return names

    def _apply_checkpoint_settings(self, subcommand: str, config, checkpoint: dict, path: Path) -> None:
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        saved_path = hparams.pop("_class_path", None) or checkpoint.get(MODEL_CLASS_KEY)
        model_class = import_class(config.model.class_path)
        if saved_path is not None and import_class(saved_path) is not model_class:
            raise CheckpointError(
                f"--ckpt_path {path}: a {import_class(saved_path).__name__} checkpoint, but the config's model is "
                f"{model_class.__name__} ({config.model.class_path}); use the config it was trained with"
            )
        if not hparams:
            return
        evaluation = set(getattr(model_class, "EVALUATION_SETTINGS", ()))
        given = config.model.get("init_args") or {}
        conflicts = []
        for name in sorted(self._explicit_model_options() & set(hparams)):
            if name in evaluation:
                hparams.pop(name)  # the command line's value applies
            elif given.get(name) != hparams[name]:
                conflicts.append(f"--model.init_args.{name}={given.get(name)} (checkpoint: {hparams[name]})")
        if conflicts:
            raise CheckpointError(
                f"--ckpt_path {path}: {', '.join(conflicts)}: the model's other settings come from its checkpoint; "
                f"at {subcommand} only {', '.join(sorted(evaluation))} can change"
            )
        update = {subcommand: {"model": {"class_path": config.model.class_path, "init_args": hparams}}}
        self.config = self.parser.parse_object(update, self.config)

    def before_instantiate_classes(self) -> None:
        set_threads(self._config_value("threads"))
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        if isinstance(logger, Namespace) and issubclass(import_class(logger.class_path), MedRecWandbLogger):
            files = [str(path) for path in config.get("config") or []]
            name_wandb_run(logger.init_args, config.clone().as_dict(), files)

    def _config_value(self, key: str):
        config = self.config[self.subcommand] if self.subcommand else self.config
        return config.get(key)

    def instantiate_trainer(self, **kwargs):
        """Adds medrec's progress output (bar on a terminal, a line per epoch elsewhere) and model
        summary, unless the trainer disables them or the config brings its own."""
        trainer = self._get(self.config_init, "trainer", default={})
        given = list(trainer.get("callbacks") or [])
        defaults = []
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            defaults.append(progress_bar())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            defaults.append(MedRecModelSummary())
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        # callback groups (checkpoint, early_stopping, predict_output, ddi_controller) join the
        # trainer's callbacks; an unset optional one (`ddi_controller: null`) is none
        keys = self._parser(self.subcommand).callback_keys
        extra = [c for c in (self._get(self.config_init, key) for key in keys) if c is not None]
        return self._instantiate_trainer({**trainer, **kwargs}, extra)

    def after_fit(self) -> None:
        """Record the best checkpoint's validation figure with the logger (W&B run summary) and
        close with one line: why training stopped, the best score, its checkpoint, the run folder."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        best = callback.best_model_score if callback is not None else None
        if trainer.logger is not None and best is not None:
            trainer.logger.log_metrics({f"best_{callback.monitor}": float(best)})
            trainer.logger.save()
        if trainer.is_global_zero:
            say(fit_summary(trainer))


def controller_settings() -> set[str]:
    """The init arguments of every DDI controller class (``target_ddi``, ``kp``, ``temperature``, ...)."""
    classes, names = [DDIController], set()
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        names |= {n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    return names


def refuse_controller_options_in_callbacks(args: list[str]) -> None:
    """``--trainer.callbacks.init_args.target_ddi`` set the last callback's setting, whichever it was;
    the controller's settings are ``--ddi_controller.init_args.<name>`` now."""
    settings = controller_settings()
    for token in args:
        match = re.fullmatch(r"--trainer\.callbacks\.(?:init_args\.)?(\w+)(?:=.*)?", token, flags=re.S)
        if match and match.group(1) in settings:
            new = f"{DDI_CONTROLLER}.init_args.{match.group(1)}"
            raise OptionError(
                f"{token.split('=', 1)[0]}: the DDI controller is no trainer callback; set it with "
                f"--{new} (in a sweep file: parameter {new})"
            )


def refuse_controller_in_callbacks(config) -> None:
    """A DDI controller listed in ``trainer.callbacks`` (a config of earlier medrec) is refused,
    naming its place: the top-level ``ddi_controller:`` key, one per run."""
    trainer = config.get("trainer") if config is not None else None
    for callback in (trainer.get("callbacks") if trainer is not None else None) or []:
        class_path = callback.get("class_path") if isinstance(callback, Namespace) else None
        if class_path is not None and issubclass(import_class(class_path), DDIController):
            raise OptionError(
                f"trainer.callbacks: {class_path.rsplit('.', 1)[-1]} is a DDI controller; give it as the top-level "
                f"`{DDI_CONTROLLER}:` of the config (class_path and init_args, as in configs/safedrug.yaml) or "
                f"--{DDI_CONTROLLER}={class_path}, not in trainer.callbacks"
            )


@rank_zero_only
def say(line: str) -> None:
    """One line on stdout, from the first process only (DDP starts one per device)."""
    print(line, flush=True)


def fit_summary(trainer: L.Trainer) -> str:
    epochs = trainer.current_epoch
    stopper = trainer.early_stopping_callback
    if trainer.interrupted:
        reason = "interrupted"
    elif stopper is not None and stopper.stopped_epoch > 0:
        reason = f"early stop: no {stopper.monitor} gain in {stopper.patience} epochs"
    elif trainer.max_epochs is not None and 0 < trainer.max_epochs <= epochs:
        reason = f"max_epochs={trainer.max_epochs}"
    else:
        reason = "stopped"
    words = [f"medrec: fit done after {epochs} epoch(s) ({reason})"]
    callback = trainer.checkpoint_callback
    if callback is not None and callback.best_model_score is not None:
        words.append(f"best {callback.monitor} {float(callback.best_model_score):.4f}: {callback.best_model_path}")
    if callback is not None and callback.dirpath:
        folder = Path(callback.dirpath)
        words.append(f"run folder {folder.parent if folder.name == 'checkpoints' else folder}")
    elif callback is None or not callback.best_model_path:
        words.append("no checkpoint written")
    return "; ".join(words)


def set_threads(threads: int | str | None) -> None:
    """Apply the ``--threads`` policy to this process (DataLoader workers keep torch's own default of 1)."""
    if threads in (None, "all"):
        return
    torch.set_num_threads(int(threads))


def make_cli(args=None, run: bool = True) -> MedRecCLI:
    quiet_lightning()
    return MedRecCLI(
        MedRecModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # main() prints a bad option as one line
        args=args,
        run=run,
    )


def main(args=None) -> None:
    """Run the CLI; a user-facing failure (bad data, option or checkpoint) is one
    ``medrec: error: ...`` line and exit code 2 (``MEDREC_DEBUG=1``: the traceback instead)."""
    run_reporting_errors("medrec", lambda: make_cli(args))


if __name__ == "__main__":
    main()

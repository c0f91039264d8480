"""medrec command line: ``python train.py fit|validate|test|predict --config configs/<method>.yaml``."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks.recommendation_writer import RecommendationWriter
from datamodules.errors import run_reporting_errors
from datamodules.safe_pickle import load_checkpoint
from lightning_modules.base import MedRecModule


class LoggedConfig(SaveConfigCallback):
    """Saves config.yaml (overwriting) and sends the full resolved config to the run's logger."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


class MedRecCLI(LightningCLI):
    """LightningCLI with medrec's wiring: data knowledge -> model, checkpoint/early stop on val Jaccard."""

    def add_arguments_to_parser(self, parser) -> None:
        # Vocabulary sizes and knowledge matrices come from the data, never from the config.
        parser.link_arguments("data.knowledge", "model.init_args.knowledge", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(RecommendationWriter, "predict_output")
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

    def after_fit(self) -> None:
        """Record the best checkpoint's validation figure with the logger (W&B run summary)."""
        callback = self.trainer.checkpoint_callback
        if self.trainer.logger is not None and callback is not None and callback.best_model_score is not None:
            self.trainer.logger.log_metrics({f"best_{callback.monitor}": float(callback.best_model_score)})
            self.trainer.logger.save()


def make_cli(args=None, run: bool = True) -> MedRecCLI:
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

    def run() -> None:
        argv = sys.argv[1:] if args is None else list(args)
        # files given as --ckpt_path (not Lightning's names last, best, ...) are read safely first:
        # missing, damaged or unsafe -> one clear line before any work starts
        values = [a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")]
        values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--ckpt_path"]
        for path in values:
            if path.lower() not in {"last", "best", "hpc", "registry", "null", "none", ""}:
                if not path.startswith("registry:"):
                    load_checkpoint(path)
        make_cli(args)

    run_reporting_errors("medrec", run)


if __name__ == "__main__":
    main()

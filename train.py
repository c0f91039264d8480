"""medrec command line: ``python train.py fit|validate|test|predict --config configs/<method>.yaml``."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks.recommendation_writer import RecommendationWriter
from datamodules.cohort import CohortError
from lightning_modules.base import MedRecModule


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


def make_cli(args=None, run: bool = True) -> MedRecCLI:
    return MedRecCLI(
        MedRecModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args=None) -> None:
    try:
        make_cli(args)
    except CohortError as err:
        print(f"medrec: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

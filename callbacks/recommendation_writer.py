"""Writes what ``train.py predict`` recommends: one row per visit, CSV or JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pandas as pd
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

COLUMNS = ["patient_id", "visit_id", "drugs", "drug_names", "probabilities", "ddi_pairs"]


def _records(predictions):
    """Flatten Lightning's per-dataloader, per-batch nesting down to the visit records."""
    if isinstance(predictions, dict):
        yield predictions
    else:
        for item in predictions:
            yield from _records(item)


class RecommendationWriter(BasePredictionWriter):
    """Saves predict records (patient, visit, drugs, names, probabilities, flagged DDI pairs).

    Args:
        path: output file; default ``<log dir>/predictions.<format>``. Under DDP each rank writes
            its own ``<stem>.rank<k><suffix>``.
        format: ``csv`` (lists joined with spaces, DDI pairs as ``A+B``) or ``jsonl``; default
            from the path's suffix, else csv.
    """

    def __init__(self, path: str | None = None, format: Literal["csv", "jsonl"] | None = None):
        super().__init__(write_interval="epoch")
        self.path = path
        self.format = format

    def _target(self, trainer) -> tuple[Path, str]:
        fmt = self.format or ("jsonl" if self.path and self.path.endswith(".jsonl") else "csv")
        path = Path(self.path) if self.path else Path(trainer.log_dir or ".") / f"predictions.{fmt}"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path, fmt

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = list(_records(predictions))
        path, fmt = self._target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            frame = pd.DataFrame(rows, columns=COLUMNS)
            for column in ("drugs", "probabilities"):
                frame[column] = frame[column].map(lambda v: " ".join(map(str, v)))
            frame["drug_names"] = frame["drug_names"].map("; ".join)
            frame["ddi_pairs"] = frame["ddi_pairs"].map(lambda pairs: " ".join("+".join(p) for p in pairs))
            frame.to_csv(path, index=False)
        rank_zero_info(f"wrote {len(rows)} visit recommendations to {path}")

"""Writes what ``train.py predict`` recommends: one row per visit, CSV or JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pandas as pd
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.recommend import check_top_k, limit_record

COLUMNS = [
    "patient_id",
    "visit_id",
    "drugs",
    "drug_names",
    "probabilities",
    "ddi_pairs",
    "recorded_drugs",
    "recorded_drug_names",
    "jaccard",
]


def _records(predictions):
    """Flatten Lightning's per-dataloader, per-batch nesting down to the visit records."""
    if isinstance(predictions, dict):
        yield predictions
    else:
        for item in predictions:
            yield from _records(item)


def _joined(values, separator: str = " ") -> str:
    """A list column as CSV text ('' where a record has no such list)."""
    return separator.join(map(str, values)) if isinstance(values, list) else ""


class RecommendationWriter(BasePredictionWriter):
    """Saves predict records: patient, visit, recommended drugs (codes, names, probabilities),
    flagged DDI pairs, the visit's recorded drugs (codes, names) and the Jaccard of the two.

    Args:
        path: output file; default ``<log dir>/predictions.<format>``. Under DDP each rank writes
            its own ``<stem>.rank<k><suffix>``.
        format: ``csv`` (lists joined with spaces, names with ``; ``, DDI pairs as ``A+B``) or
            ``jsonl``; default from the path's suffix, else csv.
        top_k: write at most this many drugs per visit, the most probable of those over the
            model's threshold (``--model.init_args.threshold``); unset = all of them.
    """

    def __init__(
        self,
        path: str | None = None,
        format: Literal["csv", "jsonl"] | None = None,
        top_k: int | None = None,
    ):
        super().__init__(write_interval="epoch")
        self.path = path
        self.format = format
        self.top_k = check_top_k(top_k, "predict_output.top_k")

    def _target(self, trainer) -> tuple[Path, str]:
        fmt = self.format or ("jsonl" if self.path and self.path.endswith(".jsonl") else "csv")
        path = Path(self.path) if self.path else Path(trainer.log_dir or ".") / f"predictions.{fmt}"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path, fmt

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = [limit_record(row, self.top_k) for row in _records(predictions)]
        path, fmt = self._target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            frame = pd.DataFrame(rows, columns=COLUMNS)
            for column in ("drugs", "probabilities", "recorded_drugs"):
                frame[column] = frame[column].map(_joined)
            for column in ("drug_names", "recorded_drug_names"):
                frame[column] = frame[column].map(lambda names: _joined(names, "; "))
            frame["ddi_pairs"] = frame["ddi_pairs"].map(lambda pairs: " ".join("+".join(p) for p in pairs))
            frame.to_csv(path, index=False)
        rank_zero_info(f"wrote {len(rows)} visit recommendations to {path}")

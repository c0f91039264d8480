"""One configuration of a model search, judged on the validation split only (the test split is never read).

    python benchmarks/validation_search.py --config configs/updater.yaml --data <folder> --out <dir> \
        [--epochs N] [--seed S] [LightningCLI overrides ...]

Trains like ``benchmarks/run.py`` (same arguments, best-validation checkpoint), then reloads the
best checkpoint, predicts the validation split once and writes ``<dir>/search.json``:

* ``val``: the validation figures of the configuration as given (Jaccard, F1, PRAUC, DDI rate,
  average drug count; full set, patient-averaged as the reference protocol);
* ``grid``: for models with an update rule (``threshold`` for the first visit, ``keep_threshold``
  for drugs of the previous prescription, ``add_threshold`` for new ones) the same figures over
  a grid of the three thresholds, and ``best_under_ddi``: the grid point of highest validation
  Jaccard whose validation DDI rate is at most ``--ddi-limit``.

Settings found here go into the config; the test split is then read once per final
configuration by ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy

from benchmarks.provenance import Provenance, run_config_hash, write_json  # noqa: E402
from benchmarks.run import timed_run  # noqa: E402
from datamodules.errors import run_reporting_errors  # noqa: E402
from lightning_modules.metrics import recommendation_metrics  # noqa: E402
from lightning_modules.micron import set_scores  # noqa: E402
from lightning_modules.updater import updated_prescription  # noqa: E402
from lightning_modules.visit_ops import previous_visit  # noqa: E402

FIGURES = ("jaccard", "f1", "prauc", "ddi_rate", "avg_drugs")
SET_FIGURES = ("jaccard", "f1", "ddi_rate", "avg_drugs")  # no ranking: the grid stays cheap
FIRST = (0.4, 0.45, 0.5)
KEEP = (0.2, 0.3, 0.35, 0.4, 0.45, 0.5)
ADD = (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of training")
    parser.add_argument("--ddi-limit", type=float, default=0.06, help="DDI rate the grid's choice must not exceed")
    return parser.parse_known_args(argv)


def figures(
    scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ddi_adj: torch.Tensor, keys=FIGURES
) -> dict:
    """The reference metrics named in ``keys`` of the sets ``scores >= 0.5``."""
    metrics = recommendation_metrics(ddi_adj)
    inputs = {"probs": scores, "target": target, "visit_mask": mask}
    values = {}
    for key in keys:
        accepted = inspect.signature(metrics[key].update).parameters
        metrics[key].update(**{k: v for k, v in inputs.items() if k in accepted})
        values[key] = float(metrics[key].compute())
    return values


@torch.no_grad()
def validation_predictions(model, data) -> list[dict]:
    """(probabilities, previous recorded drugs, targets, mask, model scores) per validation batch."""
    model.eval()
    out = []
    for batch in data.val_dataloader():
        probs = torch.sigmoid(model(batch).float())
        out.append(
            {
                "probs": probs,
                "previous": previous_visit(batch["medications"]),
                "target": batch["medications"],
                "mask": batch["visit_mask"],
                "scores": model.predict_probabilities(batch).float(),
            }
        )
    return out


def stacked(parts: list[dict], key: str) -> torch.Tensor:
    """Batches padded to one visit length and concatenated (padding visits are masked)."""
    length = max(p[key].shape[1] for p in parts)
    padded = []
    for p in parts:
        x = p[key]
        pad = [0] * (2 * (x.dim() - 2)) + [0, length - x.shape[1]]
        padded.append(torch.nn.functional.pad(x, pad))
    return torch.cat(padded)


def run(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, overrides = parse_args(argv)
    out = Path(opts.out)
    trainer, model, data, timer = timed_run(opts, overrides)
    start = time.perf_counter()
    if opts.checkpoint is None:
        trainer.fit(model, datamodule=data)
        best = trainer.checkpoint_callback.best_model_path
    else:
        data.setup("fit")
        best = opts.checkpoint
    fit_seconds = time.perf_counter() - start
    model = type(model).from_checkpoint(best)
    parts = validation_predictions(model, data)
    probs, previous, target, mask = (stacked(parts, k) for k in ("probs", "previous", "target", "mask"))
    mask = mask.bool()
    ddi_adj = model.ddi_adj.cpu()
    results: dict = {
        "config": opts.config,
        "overrides": overrides,
        "seed": opts.seed,
        "best_checkpoint": best,
        "best_epoch": int(torch.load(best, map_location="cpu", weights_only=False)["epoch"]),
        "epoch_seconds": sum(timer.epoch_seconds) / len(timer.epoch_seconds) if timer.epoch_seconds else None,
        "fit_seconds": fit_seconds,
        "val": figures(stacked(parts, "scores"), target, mask, ddi_adj),
    }
    if "keep_threshold" in model.hparams:
        grid = []
        for first, keep, add in itertools.product(FIRST, KEEP, ADD):
            sets = updated_prescription(probs, previous, mask, first, keep, add)
            row = {"threshold": first, "keep_threshold": keep, "add_threshold": add}
            row.update(figures(set_scores(sets, probs), target, mask, ddi_adj, SET_FIGURES))
            grid.append(row)
        results["grid"] = grid
        allowed = [row for row in grid if row["ddi_rate"] <= opts.ddi_limit]
        results["best_under_ddi"] = max(allowed, key=lambda r: r["jaccard"]) if allowed else None
        results["best_any"] = max(grid, key=lambda r: r["jaccard"])
    digest = run_config_hash(opts.config, opts.data, opts.epochs, opts.seed, overrides)
    provenance = Provenance.capture("benchmarks/validation_search.py", argv, digest=digest)
    results = write_json(out / "search.json", results, provenance)
    summary = {k: results[k] for k in ("val", "best_epoch", "epoch_seconds")}
    summary["best_under_ddi"] = results.get("best_under_ddi")
    print(json.dumps(summary, indent=1))
    return results


if __name__ == "__main__":  # a bad option, data folder or checkpoint: one error line, exit 2
    run_reporting_errors("benchmarks/validation_search.py", run)

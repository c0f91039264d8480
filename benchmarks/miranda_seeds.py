"""MiranDa vs its baseline predictor over several seeds (the paper's protocol: 30 seeds on MIMIC).

    python benchmarks/miranda_seeds.py --out benchmarks/reports/miranda_seeds \
        [--seeds 0 1 2 3 4] [--epochs 30] [--data <folder>] [--threads 1] \
        [--methods miranda --reuse <earlier out>] [CLI overrides ...]

Per seed s, both ``configs/miranda_baseline.yaml`` and ``configs/miranda.yaml`` are trained on
the same random split (``split=random``, ``seed=s``, 70/15/15 as in the paper) from the same
initial seed and tested from their best validation-Jaccard checkpoint: each (method, seed) is a
:mod:`benchmarks.grid` cell (``benchmarks/run.py`` in ``<out>/<method>/seed<s>/``, with
:class:`RetrievalClock` appended to the trainer's callbacks), reused when its ``results.json``
has the cell's config hash, so an interrupted invocation resumes and other overrides retrain.
Writes ``<out>/results.json`` (every run, the mean ± sample std per method, paired t-tests of
MiranDa minus baseline) and ``<out>/report.md``, both with the provenance header, which also hold:

* ELOS sanity (paper Table 2): ELOS of the *recorded* drug sets vs the real mean LOS of the same
  visits, per split (training visits never retrieve themselves);
* speed: seconds per training epoch, the share of it spent in ELOS retrieval (hard and soft),
  and one 512-visit batch: forward/backward/step vs retrieval time;
* the load average of the machine while it ran.

``--methods miranda --reuse <earlier out>`` trains MiranDa only (e.g. with other
``--model.init_args.*`` overrides, which the baseline config would reject) and pairs it with
the baseline runs of an earlier invocation on the same seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

import lightning as L  # noqa: E402

from benchmarks.grid import Cell, aggregate, paired_by_seed, run_grid  # noqa: E402
from benchmarks.provenance import Provenance, write_json, write_markdown  # noqa: E402
from datamodules.visit_sequence import VisitCollator, VisitSequenceDataModule  # noqa: E402
from lightning_modules import MiranDaPredictor  # noqa: E402
from lightning_modules.elos import StayIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"baseline": "configs/miranda_baseline.yaml", "miranda": "configs/miranda.yaml"}
KEYS = (
    "jaccard",
    "f1",
    "prauc",
    "rocauc",
    "precision",
    "recall",
    "ddi_rate",
    "avg_drugs",
    "elos",
    "los",
    "elos_coverage",
)


class RetrievalClock(L.Callback):
    """Seconds of each training epoch and the part of them spent in :class:`StayIndex` retrieval.

    Validation is excluded, as in ``callbacks.EpochTimer``; this clock adds the retrieval share.
    ``benchmarks/run.py`` puts :meth:`benchmark_figures` into the run's ``results.json``.
    """

    spent = 0.0

    def __init__(self):
        self.epochs: list[float] = []
        self.retrieval: list[float] = []
        self._start: tuple[float, float] | None = None

    @classmethod
    def install(cls) -> None:
        for name in ("retrieve", "soft_elos"):
            method = getattr(StayIndex, name)
            if getattr(method, "_clocked", False):
                continue

            @functools.wraps(method)
            def clocked(self, *args, _method=method, **kwargs):
                start = time.perf_counter()
                try:
                    return _method(self, *args, **kwargs)
                finally:
                    RetrievalClock.spent += time.perf_counter() - start

            clocked._clocked = True
            setattr(StayIndex, name, clocked)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.install()

    def benchmark_figures(self, trainer, pl_module) -> dict:
        figures = {"retrieval_seconds": float(np.mean(self.retrieval)) if self.retrieval else None}
        for name in ("therapeutic_batches", "therapeutic_steps"):
            if hasattr(pl_module, name):
                figures[name] = int(getattr(pl_module, name))
        return figures

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), RetrievalClock.spent)

    def _stop(self) -> None:
        if self._start is not None:
            self.epochs.append(time.perf_counter() - self._start[0])
            self.retrieval.append(RetrievalClock.spent - self._start[1])
            self._start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()  # a no-op for the sanity check, which comes before the first epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()


def cells(opts: argparse.Namespace, overrides: list[str]) -> list[Cell]:
    """One grid cell per (seed, method): the seed's random 70/15/15 split, the retrieval clock."""
    clock = json.dumps({"class_path": "benchmarks.miranda_seeds.RetrievalClock"})
    return [
        Cell(
            method=method,
            config=str(ROOT / METHODS[method]),
            seed=seed,
            data=opts.data,
            epochs=opts.epochs,
            overrides=(
                "--trainer.enable_progress_bar=false",
                f"--threads={opts.threads}",
                "--data.init_args.split=random",
                "--data.init_args.split_ratios=[0.7, 0.15, 0.15]",
                f"--data.init_args.seed={seed}",
                f"--trainer.callbacks+={clock}",
                *overrides,
            ),
        )
        for seed in opts.seeds
        for method in opts.methods
    ]


def run_rows(opts: argparse.Namespace, overrides: list[str]) -> list[dict]:
    """The runs of this invocation's cells (trained or reused) and of ``--reuse`` folders."""
    rows = []
    for cell, result in run_grid(cells(opts, overrides), opts.out).items():
        if isinstance(result, Exception):
            raise result
        rows.append({**result, "method": cell.method, "seed": cell.seed})
    for folder in opts.reuse:
        for method in set(METHODS) - set(opts.methods):
            for seed in opts.seeds:
                path = Path(folder) / method / f"seed{seed}" / "results.json"
                if path.is_file():
                    rows.append({**json.loads(path.read_text()), "method": method, "seed": seed})
    return rows


def recorded_elos(index: StayIndex, samples: list[dict], num_medications: int, exclude_self: bool):
    """Retrieval for the *recorded* drug set of every visit of ``samples``: (Retrieval, real LOS).

    ``exclude_self`` keeps a visit that is itself in the index from retrieving itself.
    """
    batch = VisitCollator(num_medications)(samples)
    patient, visit = batch["visit_mask"].nonzero(as_tuple=True)
    keys = torch.stack([batch["patient_index"][patient], visit], -1)
    found = index.retrieve(
        batch["medications"][patient, visit],
        batch["procedures"][patient, visit],
        batch["procedures_mask"][patient, visit],
        batch["age"][patient, visit],
        exclude=index.rows_of(keys) if exclude_self else None,
    )
    return found, batch["los"][patient, visit]


def elos_sanity(data_root: str | None, seed: int, overrides: dict) -> dict:
    """ELOS of the recorded drug sets vs real mean LOS per split (paper Table 2)."""
    dm = VisitSequenceDataModule(root=data_root, split="random", split_ratios=(0.7, 0.15, 0.15), seed=seed)
    k = dm.knowledge
    index = StayIndex.from_sequences(dm.dataset("train"), k.num_procedures, k.num_medications, **overrides)
    out = {}
    for split in ("train", "val", "test"):
        found, los = recorded_elos(index, dm.dataset(split).samples, k.num_medications, exclude_self=split == "train")
        both = found.defined & ~torch.isnan(los)
        out[split] = {
            "visits": int(len(los)),
            "covered": int(both.sum()),
            "elos_recorded": float(found.elos[both].mean()),
            "los_same_visits": float(los[both].mean()),
            "los_all_visits": float(los[~torch.isnan(los)].mean()),
        }
    return out


def batch_speed(data_root: str | None, visits: int = 512, repeats: int = 5) -> dict:
    """One training batch of about ``visits`` visits: predictor forward/backward/step vs ELOS retrieval."""
    dm = VisitSequenceDataModule(root=data_root)
    k = dm.knowledge
    train = dm.dataset("train")
    lengths = np.cumsum([len(s["medications"]) for s in train.samples])
    batch = VisitCollator(k.num_medications)(train.samples[: int(np.searchsorted(lengths, visits)) + 1])
    torch.manual_seed(0)
    model = MiranDaPredictor(knowledge=k)
    model.build_stay_index(train)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    patient, visit = batch["visit_mask"].nonzero(as_tuple=True)

    def train_step():
        logits = model(batch)
        loss = model.compute_loss(logits, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return torch.sigmoid(logits.detach())

    def retrieval(probs):
        found, _ = model.visit_stays(probs, batch, exclude_self=True)
        soft = model.stay_index.soft_elos(probs[patient, visit].requires_grad_(), found)
        soft[found.defined].sum().backward()

    def timed(fn, *args):
        fn(*args)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
        return (time.perf_counter() - start) / repeats

    step_s = timed(train_step)
    probs = train_step()
    retrieve_s = timed(retrieval, probs)
    return {
        "visits": int(batch["visit_mask"].sum()),
        "patients": int(len(batch["lengths"])),
        "forward_backward_step_ms": 1000 * step_s,
        "retrieval_hard_and_soft_ms": 1000 * retrieve_s,
        "retrieval_share": retrieve_s / step_s,
        "index_rows": len(model.stay_index),
    }


def paired(results: list[dict], key: str) -> dict:
    """MiranDa − baseline on ``key`` over the seeds both ran (paired t-test)."""
    return paired_by_seed(pd.DataFrame(results), key, "miranda", "baseline")


def summary(results: list[dict]) -> dict:
    """{method: {key: {"mean", "std"}}}: mean ± sample std over seeds (keys a method lacks are left out)."""
    table = aggregate(pd.DataFrame(results), (*KEYS, "epoch_seconds", "retrieval_seconds")).set_index("method")
    return {
        method: {
            key: {"mean": float(table.loc[method, key]), "std": float(table.loc[method, f"{key}_std"])}
            for key in (*KEYS, "epoch_seconds", "retrieval_seconds")
            if method in table.index and not np.isnan(table.loc[method, key])
        }
        for method in METHODS
    }


def report(payload: dict) -> str:
    table, tests = payload["summary"], payload["paired_tests"]

    def cell(method, key, digits=4):
        v = table[method].get(key)
        return "–" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = [
        f"# MiranDa vs baseline predictor — {len(payload['seeds'])} seeds, {payload['data']}",
        "",
        f"Random 70/15/15 split per seed, max {payload['epochs']} epochs, early stopping and test at the best "
        "validation Jaccard; mean ± std over seeds (sample std); p = paired t-test, MiranDa − baseline.",
        f"Torch threads: {payload['threads']}; load average (1, 5, 15 min) before: {payload['load_before']}, "
        f"after: {payload['load_after']}; wall time {payload['wall_minutes']:.1f} min.",
        "",
        "| method | Jaccard | F1 | PRAUC | DDI rate | avg drugs | ELOS (days) | real LOS, same visits "
        "| s/epoch | retrieval s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        lines.append(
            f"| {method} | {cell(method, 'jaccard')} | {cell(method, 'f1')} | {cell(method, 'prauc')} | "
            f"{cell(method, 'ddi_rate')} | {cell(method, 'avg_drugs', 2)} | {cell(method, 'elos', 3)} | "
            f"{cell(method, 'los', 3)} | {cell(method, 'epoch_seconds', 2)} | {cell(method, 'retrieval_seconds', 2)} |"
        )
    lines += ["", "| paired t-test (MiranDa − baseline) | mean difference | t | p |", "|---|---|---|---|"]
    for key, test in tests.items():
        t = "–" if test["t"] is None else f"{test['t']:.3f}"
        p = "–" if test["p_value"] is None else f"{test['p_value']:.4f}"
        lines.append(f"| {key} | {test['mean_difference']:+.4f} | {t} | {p} |")
    lines += [
        "",
        "Per seed:",
        "",
        "| method | seed | Jaccard | ELOS | epochs | s/epoch | therapeutic batches / inner steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["runs"]:
        phase = f"{r.get('therapeutic_batches', '–')} / {r.get('therapeutic_steps', '–')}"
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['jaccard']:.4f} | {r['elos']:.3f} | {r['epochs']} | "
            f"{r['epoch_seconds']:.2f} | {phase} |"
        )
    sanity = payload.get("elos_sanity")
    if sanity:
        lines += [
            "",
            "ELOS sanity (paper Table 2): ELOS of the recorded drug sets vs real LOS (seed 0 split)",
            "",
            "| split | visits | with ELOS | ELOS of recorded sets | real mean LOS, same visits | real mean LOS, all |",
            "|---|---|---|---|---|---|",
        ]
        for split, s in sanity.items():
            lines.append(
                f"| {split} | {s['visits']} | {s['covered']} | {s['elos_recorded']:.3f} | {s['los_same_visits']:.3f} | "
                f"{s['los_all_visits']:.3f} |"
            )
    speed = payload.get("batch_speed")
    if speed:
        lines += [
            "",
            f"One training batch of {speed['visits']} visits ({speed['patients']} patients; index of "
            f"{speed['index_rows']} training visits): forward+backward+Adam step "
            f"{speed['forward_backward_step_ms']:.1f} ms, ELOS retrieval (hard + soft with its backward) "
            f"{speed['retrieval_hard_and_soft_ms']:.1f} ms = {100 * speed['retrieval_share']:.1f} % of it.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--data", default=None, help="data root; default the synthetic cohort")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed cores slow torch badly)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to train")
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        help="earlier output folders: their runs of methods not trained now (same seeds) join the report",
    )
    opts, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    RetrievalClock.install()
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    speed = batch_speed(opts.data)
    sanity = elos_sanity(opts.data, opts.seeds[0], {})
    runs = run_rows(opts, overrides)
    payload = {
        "data": opts.data or "synthetic",
        "seeds": opts.seeds,
        "epochs": opts.epochs,
        "threads": opts.threads,
        "overrides": overrides,
        "runs": runs,
        "summary": summary(runs),
        "paired_tests": {key: paired(runs, key) for key in ("elos", "jaccard", "f1", "prauc", "ddi_rate")},
        "elos_sanity": sanity,
        "batch_speed": speed,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_minutes": (time.perf_counter() - start) / 60,
    }
    grid = sorted(c.hash for c in cells(opts, overrides))
    provenance = Provenance.capture("benchmarks/miranda_seeds.py", argv, config={"cells": grid, "reuse": opts.reuse})
    payload = write_json(out / "results.json", payload, provenance)
    print(write_markdown(out / "report.md", report(payload), provenance))
    return payload


if __name__ == "__main__":
    main()

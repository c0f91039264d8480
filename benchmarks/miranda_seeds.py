"""MiranDa vs its baseline predictor over several seeds (the paper's protocol: 30 seeds on MIMIC).

    python benchmarks/miranda_seeds.py --out benchmarks/reports/miranda_seeds \
        [--seeds 0 1 2 3 4] [--epochs 30] [--data <folder>] [--threads 1] \
        [--methods miranda --reuse <earlier out>/runs.json] [--resume] [CLI overrides ...]

Per seed s, both ``configs/miranda_baseline.yaml`` and ``configs/miranda.yaml`` are trained on
the same random split (``split=random``, ``seed=s``, 70/15/15 as in the paper) from the same
initial seed and tested from their best validation-Jaccard checkpoint. Writes
``<out>/results.json`` (every run, the mean ± std per method, paired t-tests of MiranDa minus
baseline) and ``<out>/report.md``, which also holds:

* ELOS sanity (paper Table 2): ELOS of the *recorded* drug sets vs the real mean LOS of the same
  visits, per split (training visits never retrieve themselves);
* speed: seconds per training epoch, the share of it spent in ELOS retrieval (hard and soft),
  and one 512-visit batch: forward/backward/step vs retrieval time;
* the load average of the machine while it ran.

``--resume`` keeps the runs an interrupted (or smaller) invocation left in ``<out>/runs.json``
with the same CLI overrides and trains only the missing method/seed pairs.
``--methods miranda --reuse <earlier>/runs.json`` trains MiranDa only (e.g. with other
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from scipy import stats  # noqa: E402

from datamodules.visit_sequence import VisitCollator, VisitSequenceDataModule  # noqa: E402
from lightning_modules import MiranDaPredictor  # noqa: E402
from lightning_modules.elos import StayIndex  # noqa: E402
from train import make_cli  # noqa: E402

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


def run_one(method: str, seed: int, opts, overrides: list[str]) -> dict:
    out = Path(opts.out) / f"{method}-seed{seed}"
    args = [
        "--config",
        str(ROOT / METHODS[method]),
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        str(opts.epochs),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out / "logs"),
        "--checkpoint.dirpath",
        str(out / "checkpoints"),
        "--data.init_args.split",
        "random",
        "--data.init_args.split_ratios",
        "[0.7, 0.15, 0.15]",
        "--data.init_args.seed",
        str(seed),
    ]
    if opts.data:
        args += ["--data.init_args.root", opts.data]
    cli = make_cli(args + overrides, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    clock = RetrievalClock()
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=data)
    epochs, retrieval = list(clock.epochs), list(clock.retrieval)
    best = trainer.checkpoint_callback.best_model_path
    trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"method": method, "seed": seed, "epochs": len(epochs), "best_checkpoint": best}
    for key in KEYS:
        result[key] = logged.get(f"test_{key}")
    result["epoch_seconds"] = float(np.mean(epochs)) if epochs else None
    result["retrieval_seconds"] = float(np.mean(retrieval)) if retrieval else None
    for name in ("therapeutic_batches", "therapeutic_steps"):
        if hasattr(model, name):
            result[name] = int(getattr(model, name))
    print(json.dumps(result), flush=True)
    return result


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
    base = {r["seed"]: r[key] for r in results if r["method"] == "baseline"}
    mira = {r["seed"]: r[key] for r in results if r["method"] == "miranda"}
    seeds = sorted(set(base) & set(mira))
    a = np.array([mira[s] for s in seeds], dtype=float)
    b = np.array([base[s] for s in seeds], dtype=float)
    test = stats.ttest_rel(a, b) if len(seeds) > 1 else None
    return {
        "seeds": seeds,
        "mean_difference": float((a - b).mean()),
        "t": None if test is None else float(test.statistic),
        "p_value": None if test is None else float(test.pvalue),
    }


def summary(results: list[dict]) -> dict:
    table = {}
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        table[method] = {}
        for key in (*KEYS, "epoch_seconds", "retrieval_seconds"):
            values = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
            if len(values):
                table[method][key] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                }
    return table


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--data", default=None, help="data root; default the synthetic cohort")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed cores slow torch badly)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to train")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in <out>/runs.json made with the same overrides; train only the missing ones",
    )
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        help="runs.json of earlier invocations: their runs of methods not trained now (same seeds) join the report",
    )
    opts, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(opts.threads)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    RetrievalClock.install()
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    speed = batch_speed(opts.data)
    sanity = elos_sanity(opts.data, opts.seeds[0], {})
    runs = [
        run
        for path in opts.reuse
        for run in json.loads(Path(path).read_text())
        if run["method"] not in opts.methods and run["seed"] in opts.seeds
    ]
    done = Path(opts.out) / "runs.json"
    if opts.resume and done.exists():
        runs += [
            run
            for run in json.loads(done.read_text())
            if run["method"] in opts.methods and run["seed"] in opts.seeds and run.get("overrides", []) == overrides
        ]
    for seed in opts.seeds:
        for method in opts.methods:
            if any(run["method"] == method and run["seed"] == seed for run in runs):
                continue
            runs.append({**run_one(method, seed, opts, overrides), "overrides": overrides})
            done.write_text(json.dumps(runs, indent=1))
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
    (Path(opts.out) / "results.json").write_text(json.dumps(payload, indent=1))
    (Path(opts.out) / "report.md").write_text(report(payload))
    print(report(payload))
    return payload


if __name__ == "__main__":
    main()

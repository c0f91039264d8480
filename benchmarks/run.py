"""Train, test and measure one method on one data folder.

    python benchmarks/run.py --config configs/<m>.yaml --data <folder> --out <dir> \
        [--epochs N] [--seed S] [LightningCLI overrides ...]

Writes ``<dir>/results.json`` (bootstrap means of the test metrics with ``<key>_std``, full
test-set figures under ``all_<key>``, the best checkpoint's ``val_jaccard``, ``epoch_seconds``,
``infer_seconds``, ``peak_rss_mb``, ``params``, every other ``test_<key>`` the model logs as
``<key>``, the figures of any callback with a ``benchmark_figures(trainer, model)`` method, and
``provenance``: command, commit, config hash) and ``<dir>/results.md`` (the provenance header and
one table row). Without ``--data`` the synthetic default cohort is used. :mod:`benchmarks.grid`
runs it over configs × seeds.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from benchmarks.provenance import Provenance, run_config_hash, write_json, write_markdown  # noqa: E402
from callbacks.epoch_timer import EpochTimer  # noqa: E402
from datamodules.errors import run_reporting_errors  # noqa: E402
from train import make_cli  # noqa: E402

METRICS = ("jaccard", "f1", "prauc", "precision", "recall", "rocauc", "ddi_rate", "avg_drugs")
TABLE_HEADER = (
    "| method | data | Jaccard | F1 | PRAUC | DDI rate | avg drugs "
    "| s/epoch | epochs | infer s | peak RSS MB | params |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/<method>.yaml")
    parser.add_argument(
        "--data", default=None, help="data root (cohort, benchmark pickles, raw MIMIC); default synthetic"
    )
    parser.add_argument("--out", required=True, help="output folder for results.json / results.md / logs")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--seed", type=int, default=None, help="override seed_everything")
    return parser.parse_known_args(argv)


def cli_arguments(opts: argparse.Namespace, overrides: list[str]) -> list[str]:
    out = Path(opts.out)
    args = ["--config", opts.config]
    if opts.data is not None:
        args += ["--data.init_args.root", opts.data]
    if opts.epochs is not None:
        args += ["--trainer.max_epochs", str(opts.epochs)]
    if opts.seed is not None:
        args += ["--seed_everything", str(opts.seed)]
    args += [
        "--trainer.logger.init_args.save_dir",
        str(out / "logs"),
        "--checkpoint.dirpath",
        str(out / "checkpoints"),
    ]
    return args + overrides


def timed_run(opts: argparse.Namespace, overrides: list[str]) -> tuple:
    """(trainer, model, datamodule, epoch timer) of the run ``opts`` describe, its folder made."""
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    cli = make_cli(cli_arguments(opts, overrides), run=False)
    trainer = cli.trainer
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    if timer is None:
        timer = EpochTimer()
        trainer.callbacks.append(timer)
    return trainer, cli.model, cli.datamodule, timer


def run(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, overrides = parse_args(argv)
    out = Path(opts.out)
    trainer, model, data, timer = timed_run(opts, overrides)

    trainer.fit(model, datamodule=data)
    epochs = list(timer.epoch_seconds)  # test(ckpt_path=best) restores the timer's state from that epoch
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    start = time.perf_counter()
    trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False)
    infer_seconds = time.perf_counter() - start
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    results: dict = {"method": Path(opts.config).stem, "data": opts.data or "synthetic", "config": opts.config}
    for key in METRICS:
        results[key] = logged.get(f"test_{key}")
        results[f"{key}_std"] = logged.get(f"test_{key}_std")
        results[f"all_{key}"] = logged.get(f"test_all_{key}")
    for name, value in logged.items():  # a method's own test figures (MiranDa's ELOS, ...)
        if name.startswith("test_") and name not in ("test_patients",):
            results.setdefault(name.removeprefix("test_"), value)
    results.update(
        {
            "test_patients": int(logged.get("test_patients", 0)),
            "epochs": len(epochs),
            "epoch_seconds": sum(epochs) / len(epochs) if epochs else None,
            "infer_seconds": infer_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": int(sum(p.numel() for p in model.parameters())),
            "best_checkpoint": best,
            "val_jaccard": _best_score(trainer),
            "overrides": overrides,
        }
    )
    for callback in trainer.callbacks:  # measurements a script adds through --trainer.callbacks+=
        if hasattr(callback, "benchmark_figures"):
            results.update(callback.benchmark_figures(trainer, model))
    digest = run_config_hash(opts.config, opts.data, opts.epochs, opts.seed, overrides)  # what grid.py compares
    provenance = Provenance.capture("benchmarks/run.py", argv, digest=digest)
    results = write_json(out / "results.json", results, provenance)
    write_markdown(out / "results.md", TABLE_HEADER + table_row(results) + "\n", provenance)
    print(TABLE_HEADER + table_row(results))
    return results


def _best_score(trainer) -> float | None:
    """The monitored validation figure (val_jaccard) of the best checkpoint, the one tested."""
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    return None if score is None else float(score)


def _pm(results: dict, key: str) -> str:
    value, std = results.get(key), results.get(f"{key}_std")
    if value is None:
        return "–"
    return f"{value:.4f} ± {std:.4f}" if std is not None else f"{value:.4f}"


def table_row(results: dict) -> str:
    eps = results.get("epoch_seconds")
    return (
        f"| {results['method']} | {Path(str(results['data'])).name} | {_pm(results, 'jaccard')} | "
        f"{_pm(results, 'f1')} | {_pm(results, 'prauc')} | {_pm(results, 'ddi_rate')} | "
        f"{_pm(results, 'avg_drugs')} | {'–' if eps is None else f'{eps:.2f}'} | {results['epochs']} | "
        f"{results['infer_seconds']:.2f} | {results['peak_rss_mb']:.0f} | {results['params']:,} |"
    )


def main(argv: list[str] | None = None) -> None:
    """``run`` with medrec's error contract: a bad option, data folder or checkpoint is one
    ``benchmarks/run.py: error: ...`` line and exit code 2 (``MEDREC_DEBUG=1``: the traceback)."""
    run_reporting_errors("benchmarks/run.py", lambda: run(argv))


if __name__ == "__main__":
    main()

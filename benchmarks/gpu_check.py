"""One-GPU check: every method fits and tests on CUDA (fp32 and bf16-mixed), epoch seconds by batch
size, and CPU vs GPU test metrics of the same checkpoint.

    python benchmarks/gpu_check.py --out <dir> [--data <benchmark folder>] [--device cuda]
        [--configs retain.yaml safedrug.yaml ...] [--all-configs] [--batches 40]

Writes ``<dir>/gpu_check.json`` and ``<dir>/gpu_check.md`` (both start with the provenance:
command, commit, config hash; :mod:`benchmarks.provenance`).
Sized for one H100/H200 in about 6 minutes (``--budget`` 420 s: steps not started by then are
recorded as skipped), in this order: (d), (c), (b). (b) one capped epoch (``--batches``) + a full test of
each method's main config (``--all-configs``: every file in configs/), fp32 and bf16-mixed, on
the benchmark (MiranDa, which needs length of stay, on the synthetic cohort); (c) 3 training
epochs of SafeDrug, GAMENet, MiranDa and DPR-WG at batch sizes 16, 64, 256 (``epoch_seconds`` of
epochs 2-3, validation excluded); (d) a seeded one-epoch CPU fit of RETAIN, SafeDrug and GAMENet,
tested from its checkpoint on the CPU and on the GPU (max |difference| of every test figure).
``--device cpu`` runs the same steps without a GPU (a smoke test of the script).

A GPU machine without network access needs, beside its CUDA build of torch (>= 2.1), lightning,
torchmetrics, torch-geometric, numpy, pandas, pyarrow and scipy (usually there), the wheels of
medrec's other dependencies for its Python (e.g. cp312, manylinux x86_64), downloaded elsewhere:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        rdkit jsonargparse docstring-parser typeshed-client importlib-resources omegaconf \\
        antlr4-python3-runtime duckdb dill
    # there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.

and a copy of the benchmark folder inside the repository (``../shared`` does not travel), e.g.
``mkdir -p .gpu_data && cp -r ../shared/data/mimic3-safedrug .gpu_data/`` with ``/.gpu_data/``
in ``.git/info/exclude``, then ``--data .gpu_data/mimic3-safedrug``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.provenance import Provenance, options_config, write_json, write_markdown  # noqa: E402
from callbacks.epoch_timer import EpochTimer  # noqa: E402
from train import make_cli  # noqa: E402

MAIN_CONFIGS = [
    "frequency.yaml",
    "nearest.yaml",
    "lr.yaml",
    "retain.yaml",
    "safedrug.yaml",
    "gamenet.yaml",
    "miranda.yaml",
    "ncf.yaml",
    "dpr_wg.yaml",
    "dpr_ag.yaml",
]
TIMED = ["safedrug.yaml", "gamenet.yaml", "miranda.yaml", "dpr_wg.yaml"]
BATCH_SIZES = [16, 64, 256]
COMPARED = ["retain.yaml", "safedrug.yaml", "gamenet.yaml"]
NEEDS_STAY = ("MiranDa",)  # model classes that need visit fields the benchmark lacks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / gpu_check.md and the runs")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mimic3-safedrug"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--configs", nargs="*", default=None, help="config files for step (b); default: main ones")
    parser.add_argument("--all-configs", action="store_true", help="step (b) over every file in configs/")
    parser.add_argument("--batches", type=int, default=40, help="training batches of the one-epoch fits in (b), (d)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs in (c)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=BATCH_SIZES)
    parser.add_argument("--timed", nargs="*", default=TIMED, help="configs timed in (c)")
    parser.add_argument("--compared", nargs="*", default=COMPARED, help="configs compared CPU vs GPU in (d)")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds after which the remaining steps are skipped (recorded)"
    )
    return parser.parse_args(argv)


def data_for(config: str, data: str) -> list[str]:
    model = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["class_path"]
    return [] if any(name in model for name in NEEDS_STAY) else [f"--data.init_args.root={data}"]


def run(subcommand: str, config: str, out: Path, name: str, device: str, *extra: str):
    """One train.py command in this process; returns the CLI (trainer and its logged metrics)."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    args = [
        subcommand,
        "--config",
        str(ROOT / "configs" / config),
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.logger.init_args.name={name}",
        f"--checkpoint.dirpath={out / 'checkpoints' / name}",
        *extra,
    ]
    return make_cli(args)


def figures(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test_")}


DEADLINE = [float("inf")]  # perf_counter time after which steps are skipped (--budget)


def step(name: str, rows: list[dict], fn, *args, **row) -> dict:
    """``fn(*args)``'s figures as one row of ``rows``, or the error it raised."""
    start = time.perf_counter()
    if start > DEADLINE[0]:
        row.update(status="skipped (--budget spent)", seconds=0.0)
        rows.append(row)
        return row
    try:
        row.update(fn(*args) or {}, status="ok")
    except BaseException as err:  # a failing config is a finding, not the end of the check
        if isinstance(err, KeyboardInterrupt):
            raise
        row.update(status=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - start, 2)
    rows.append(row)
    print(f"[{name}] {json.dumps(row)}", flush=True)
    return row


def fit_and_test(config, opts, out, precision) -> dict:
    name = f"b_{Path(config).stem}_{precision}"
    extra = [*data_for(config, opts.data), f"--trainer.precision={precision}", "--trainer.max_epochs=1"]
    extra += [f"--trainer.limit_train_batches={opts.batches}"]
    run("fit", config, out, name, opts.device, *extra)
    tested = run(
        "test", config, out, name, opts.device, *extra, f"--ckpt_path={out / 'checkpoints' / name / 'last.ckpt'}"
    )
    got = figures(tested)
    return {"test_jaccard": got.get("test_jaccard"), "test_ddi_rate": got.get("test_ddi_rate")}


def epoch_seconds(config, opts, out, batch_size) -> dict:
    name = f"c_{Path(config).stem}_{batch_size}"
    extra = [*data_for(config, opts.data), f"--trainer.max_epochs={opts.epochs}"]
    extra += [f"--data.init_args.batch_size={batch_size}", "--early_stopping.patience=1000"]
    cli = run("fit", config, out, name, opts.device, *extra)
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, EpochTimer))
    later = timer.epoch_seconds[1:] or timer.epoch_seconds
    return {
        "epoch_seconds": round(statistics.median(later), 3),
        "first_epoch_seconds": round(timer.epoch_seconds[0], 3),
    }


def cpu_vs_device(config, opts, out) -> dict:
    name = f"d_{Path(config).stem}"
    extra = [*data_for(config, opts.data), "--trainer.max_epochs=1", f"--trainer.limit_train_batches={opts.batches}"]
    run("fit", config, out, name, "cpu", *extra, "--seed_everything=7")
    ckpt = f"--ckpt_path={out / 'checkpoints' / name / 'last.ckpt'}"
    on_cpu = figures(run("test", config, out, name, "cpu", *extra, ckpt))
    on_device = figures(run("test", config, out, name, opts.device, *extra, ckpt))
    diff = max(abs(on_cpu[k] - on_device[k]) for k in on_cpu)
    return {
        "max_abs_diff": diff,
        "test_jaccard_cpu": on_cpu["test_jaccard"],
        "test_jaccard_device": on_device["test_jaccard"],
    }


def environment(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "device": torch.cuda.get_device_name(0)
        if device == "cuda" and torch.cuda.is_available()
        else platform.processor(),
        "cuda_available": torch.cuda.is_available(),
    }
    return info


def _f(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(title: str, columns: list[tuple[str, str]], rows: list[dict]) -> list[str]:
    """A markdown section: ``columns`` are (header, row key) pairs."""
    lines = ["", f"## {title}", "", "| " + " | ".join(h for h, _ in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(_f(r.get(key)) for _, key in columns) + " |" for r in rows]
    return lines


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(f"{k}: {v}" for k, v in report["environment"].items()) + " |"]
    lines += _table(
        "(b) fit + test",
        [("config", "config"), ("precision", "precision"), ("status", "status"), ("test Jaccard", "test_jaccard")]
        + [("test DDI", "test_ddi_rate"), ("s", "seconds")],
        report["fit_test"],
    )
    lines += _table(
        "(c) training epoch seconds",
        [("config", "config"), ("batch size", "batch_size"), ("status", "status"), ("s/epoch", "epoch_seconds")]
        + [("first epoch s", "first_epoch_seconds")],
        report["epoch_seconds"],
    )
    lines += _table(
        "(d) same checkpoint, CPU vs device",
        [("config", "config"), ("status", "status"), ("max abs diff", "max_abs_diff")]
        + [("Jaccard CPU", "test_jaccard_cpu")],
        report["cpu_vs_device"],
    )
    lines.append(f"\nTotal {report['total_seconds']} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    opts = parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    provenance = Provenance.capture("benchmarks/gpu_check.py", argv, config=options_config(opts))
    report = {
        "environment": environment(opts.device),
        "fit_test": [],
        "epoch_seconds": [],
        "cpu_vs_device": [],
    }
    print(json.dumps(report["environment"]), flush=True)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("medrec: error: --device cuda but torch sees no CUDA device")
    configs = (
        sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
        if opts.all_configs
        else (opts.configs or MAIN_CONFIGS)
    )
    DEADLINE[0] = start + opts.budget
    # most telling first: the same checkpoint on both devices, then speed, then every method
    for config in opts.compared:
        step("d", report["cpu_vs_device"], cpu_vs_device, config, opts, out, config=config)
    for config in opts.timed:
        for size in opts.batch_sizes:
            step("c", report["epoch_seconds"], epoch_seconds, config, opts, out, size, config=config, batch_size=size)
    for config in configs:
        for precision in ("32-true", "bf16-mixed"):
            step(
                "b", report["fit_test"], fit_and_test, config, opts, out, precision, config=config, precision=precision
            )
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report = write_json(out / "gpu_check.json", report, provenance)
    print(write_markdown(out / "gpu_check.md", markdown(report), provenance))
    return report


if __name__ == "__main__":
    main()

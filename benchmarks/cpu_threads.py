"""Training-epoch seconds with each CPU thread policy of train.py, on a quiet and on a busy machine.

    python benchmarks/cpu_threads.py --out <folder> [--methods safedrug gamenet retain]
        [--data ../shared/data/mimic3-safedrug] [--batches 80] [--repeats 2] [--conditions quiet busy]

For each method (``configs/<method>.yaml``), each thread setting (the default, i.e. no
``--threads`` at all, ``--threads 1`` and ``--threads all``) and each condition (``quiet``: nothing
else started; ``busy``: a separate one-core busy process, ``python -c "while True: pass"``, started
before the run and killed after it), it runs train.py as a subprocess exactly as a user does,

    python train.py fit --config configs/<method>.yaml --data.init_args.root=<data> [--threads ...]

plus options that bound the work and keep the run's files out of ``runs/`` (``LIMITS`` below), and
reads the training epoch's wall-clock seconds (``epoch_seconds``, callbacks/epoch_timer.py, training
batches only) from the run's CSV log. A cell is the median over ``--repeats``; settings are
interleaved so a drift in the machine's load hits all of them alike. ``default / best`` divides the
default's seconds by the fastest setting's in the same row.

Writes ``<out>/cpu_threads.md`` (the provenance header: command, commit, config hash; the machine,
the table) and ``<out>/cpu_threads.json`` (the same plus every single measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.provenance import Provenance, options_config, write_json, write_markdown  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mimic3-safedrug"
SETTINGS = {"default": [], "1": ["--threads", "1"], "all": ["--threads", "all"]}
CONDITIONS = ("quiet", "busy")
BUSY_CODE = "while True: pass"
# One training epoch of a bounded number of batches. Validation is cut to one batch (the epoch timer
# leaves it out) rather than skipped: early stopping, the checkpoint and SafeDrug's plateau
# scheduler all need val_jaccard. The progress bar is off because the output goes to a pipe.
LIMITS = [
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
]
# torch sizes its default pool from these; a user's shell normally has neither, and one left over
# from an ad-hoc run would make "all" and the default mean something else.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def train_command(method: str, data: str | None, batches: int, setting: str, log_dir: str) -> list[str]:
    """The train.py command line of one measurement."""
    command = [sys.executable, "train.py", "fit", "--config", f"configs/{method}.yaml"]
    if data is not None:
        command.append(f"--data.init_args.root={data}")
    return [
        *command,
        *LIMITS,
        f"--trainer.limit_train_batches={batches}",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        *SETTINGS[setting],
    ]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["PYTHONWARNINGS"] = "ignore"
    return env


@contextlib.contextmanager
def busy_process(enabled: bool):
    """A separate CPU-bound process spinning on one core for the duration of the block."""
    if not enabled:
        yield None
        return
    process = subprocess.Popen([sys.executable, "-c", BUSY_CODE])
    try:
        time.sleep(0.5)  # let it reach the busy loop before the measured run starts
        yield process
    finally:
        process.kill()
        process.wait()


def epoch_seconds(log_dir: Path) -> float:
    """The one ``epoch_seconds`` value in the run's CSV log under ``log_dir``."""
    import csv

    files = sorted(log_dir.rglob("metrics.csv"))
    if len(files) != 1:
        raise RuntimeError(f"expected one metrics.csv under {log_dir}, found {len(files)}")
    with files[0].open() as f:
        values = [float(row["epoch_seconds"]) for row in csv.DictReader(f) if row.get("epoch_seconds")]
    if len(values) != 1:
        raise RuntimeError(f"{files[0]}: expected one epoch_seconds value, found {values}")
    return values[0]


def measure_one(method: str, data: str | None, batches: int, setting: str, busy: bool) -> dict:
    """Run train.py once (with the busy process around it if ``busy``); its epoch seconds and wall time."""
    with tempfile.TemporaryDirectory(prefix="cpu-threads-") as tmp:
        command = train_command(method, data, batches, setting, tmp)
        with busy_process(busy):
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True)
            wall = time.perf_counter() - start
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
            raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}:\n{tail}")
        seconds = epoch_seconds(Path(tmp))
    return {"epoch_seconds": seconds, "wall_seconds": round(wall, 2)}


def measure(
    methods: list[str], data: str | None, batches: int, repeats: int, conditions: list[str], log=print
) -> list[dict]:
    """One row per (method, condition): the seconds of every setting in every repeat, and the medians."""
    runs: dict[tuple[str, str], dict[str, list[float]]] = {
        (m, c): {s: [] for s in SETTINGS} for c in conditions for m in methods
    }
    for repeat in range(repeats):
        for condition in conditions:
            for method in methods:
                for setting in SETTINGS:
                    result = measure_one(method, data, batches, setting, busy=condition == "busy")
                    runs[method, condition][setting].append(result["epoch_seconds"])
                    log(
                        f"[{repeat + 1}/{repeats}] {method:10s} {condition:5s} threads={setting:7s} "
                        f"{result['epoch_seconds']:8.2f} s/epoch  (run {result['wall_seconds']:.1f} s)"
                    )
    rows = []
    for (method, condition), seconds in runs.items():
        # ratios from the reported (rounded) figures, so the table is consistent with itself
        medians = {s: round(statistics.median(v), 4) for s, v in seconds.items()}
        best = min(medians, key=medians.get)
        rows.append(
            {
                "method": method,
                "condition": condition,
                "seconds": medians,
                "runs": {s: [round(x, 4) for x in v] for s, v in seconds.items()},
                "best": best,
                "default_over_best": round(medians["default"] / medians[best], 3),
                "all_over_1": round(medians["all"] / medians["1"], 3),
            }
        )
    return rows


def torch_default_threads() -> int:
    """torch's intra-op thread count in a fresh process with the benchmark's environment."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True).stdout)


def threads_default() -> str:
    """train.py's ``--threads`` default at this commit, as ``--print_config`` shows it."""
    command = [sys.executable, "train.py", "fit", "--config", "configs/retain.yaml", "--print_config"]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    found = [line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("threads:")]
    return found[0] if found else "unknown"


def machine() -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_default_threads": torch_default_threads(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# CPU threads: training-epoch seconds by thread setting, quiet and busy machine",
        "",
        f"Date: {report['date']}; wall time {report['wall_minutes']:.1f} min",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} (its default intra-op threads here: "
        f"{m['torch_default_threads']}); Python {m['python']}. Load average (1, 5, 15 min) before: "
        f"{report['load_before']}, after: {report['load_after']}.",
        "",
        f"Data: `{report['data'] or 'synthetic default cohort'}`. Each cell: one training epoch of "
        f"{report['batches']} batches (the configs' batch sizes), `epoch_seconds` of the epoch timer "
        f"(training batches only), median of {report['repeats']} run(s). Every run is "
        "`python train.py fit --config configs/<method>.yaml --data.init_args.root=<data>` plus "
        f"`{' '.join(report['limits'])} --trainer.limit_train_batches={report['batches']} "
        "--trainer.logger.init_args.save_dir=<temporary folder>` and the setting's option: default = no "
        f"`--threads` (what a user types; train.py's default at this commit: {report['threads_default']}), "
        "`--threads 1`, `--threads all` (torch's default, every core). "
        f"{', '.join(report['thread_env'])} are removed from the runs' environment. Busy = a separate process "
        f'`python -c "{BUSY_CODE}"` spinning on one core, started before the run and killed after it.',
        "",
        "| method | competing busy process | default (no `--threads`) s | `--threads 1` s | `--threads all` s "
        "| default / best | all / 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        s = r["seconds"]
        cells = [
            r["method"],
            "yes" if r["condition"] == "busy" else "no",
            f"{s['default']:.2f}",
            f"{s['1']:.2f}",
            f"{s['all']:.2f}",
            f"{r['default_over_best']:.2f}",
            f"{r['all_over_1']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    worst = report["worst"]
    lines += [
        "",
        f"Worst case default / best: **{worst['default_over_best']:.2f}×** ({worst['method']}, "
        f"{'busy' if worst['condition'] == 'busy' else 'quiet'} machine); acceptance ≤ 1.3×: "
        f"{'met' if worst['default_over_best'] <= 1.3 else 'NOT met'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for cpu_threads.md and cpu_threads.json")
    parser.add_argument("--methods", nargs="+", default=["safedrug", "gamenet", "retain"], help="configs/<m>.yaml")
    parser.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="cohort folder passed as --data.init_args.root; 'synthetic' = the configs' synthetic default "
        "(default: ../shared/data/mimic3-safedrug)",
    )
    parser.add_argument("--batches", type=int, default=80, help="training batches per measured epoch")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (the median is reported)")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    args = parser.parse_args(argv)
    if args.batches < 1 or args.repeats < 1:
        parser.error("--batches and --repeats must be >= 1")
    for method in args.methods:
        if not (ROOT / "configs" / f"{method}.yaml").is_file():
            parser.error(f"--methods: no configs/{method}.yaml")
    data = None if args.data == "synthetic" else str(Path(args.data).resolve())
    if data is not None and not Path(data).exists():
        parser.error(f"--data: {data} does not exist")

    started = time.time()
    provenance = Provenance.capture("benchmarks/cpu_threads.py", argv, config=options_config(args))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine(),
        "load_before": load_average(),
        "data": data,
        "batches": args.batches,
        "repeats": args.repeats,
        "limits": LIMITS,
        "thread_env": list(THREAD_ENV),
        "busy_process": [sys.executable, "-c", BUSY_CODE],
        "threads_default": threads_default(),
    }
    report["rows"] = measure(args.methods, data, args.batches, args.repeats, args.conditions)
    report["load_after"] = load_average()
    report["wall_minutes"] = round((time.time() - started) / 60, 2)
    report["worst"] = max(report["rows"], key=lambda r: r["default_over_best"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = write_json(out / "cpu_threads.json", report, provenance)
    print(write_markdown(out / "cpu_threads.md", markdown(report), provenance))
    return report


if __name__ == "__main__":
    main()

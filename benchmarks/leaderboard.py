"""Leaderboard: every method on one cohort, several seeds, one report a person can read.

    python benchmarks/leaderboard.py --data ../shared/data/mimic3-safedrug --out reports/mimic3 \
        [--configs configs/lr.yaml configs/retain.yaml ...] [--seeds 0 1 2] [--reference safedrug] \
        [--epochs N] [--gamma-report <sweep out>/gamma.json] [--jobs 2 --threads 1]

By default it runs every main method config (``lightning_modules.registry.method_configs``:
each ``configs/*.yaml`` without a ``# medrec-variant:`` header). A method whose model needs visit
fields the data lack (MiranDa: length of stay, age, procedures; not in the benchmark pickles)
stops with that message at set-up; its first seed's message is printed and the method is left
out of the report (named under "Skipped"), instead of failing the whole leaderboard.

Runs each (config, seed) as one :mod:`benchmarks.grid` cell (``benchmarks/run.py`` in its own
process, folder ``<out>/<method>/seed<s>``; a cell whose ``results.json`` has the cell's config
hash is reused, so an interrupted report resumes; ``--jobs`` runs several at once), then writes
``<out>/report.md`` (provenance header; mean ± sample std over seeds of the bootstrap means,
paired t-test of Jaccard against the reference method over the same seeds) and PNG plots:
Jaccard vs DDI rate for all methods, validation Jaccard per epoch, and SafeDrug's
γ-controllability curve when a γ sweep result is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.grid import QUIET, CellFailed, aggregate, grid_cells, paired_t_test, results_frame, run_grid  # noqa: E402
from benchmarks.provenance import Provenance, write_markdown  # noqa: E402
from lightning_modules.registry import config_path, method_configs  # noqa: E402

MISSING_FIELDS = "needs visit field(s)"  # the start of CohortKnowledge.require's message
COLUMNS = ("jaccard", "f1", "prauc", "ddi_rate", "avg_drugs", "epoch_seconds", "infer_seconds", "peak_rss_mb")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data root; default the synthetic cohort")
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", default=None, help="config files (default: every landed method)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--reference", default=None, help="method of the t-test reference (default: safedrug if run, else the first)"
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--gamma-report", default=None, help="JSON rows {gamma, jaccard, ddi_rate} of a γ sweep")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    parser.add_argument(
        "--threads", type=int, default=None, help="train.py --threads of each run (default: train.py's, 1)"
    )
    return parser.parse_args(argv)


def default_configs() -> list[str]:
    """Every main method config (variants are left to their own tables)."""
    return [str(config_path(name)) for name in method_configs()]


class MissingFields(RuntimeError):
    """The method's model needs visit fields these data do not have."""


def cells(configs: list[str], opts: argparse.Namespace) -> list:
    overrides = [*QUIET] + ([f"--threads={opts.threads}"] if opts.threads else [])
    return grid_cells(configs, opts.seeds, data=opts.data, epochs=opts.epochs, overrides=overrides)


def missing_fields(error: Exception) -> MissingFields | None:
    """A failed cell whose log says the data lack the method's visit fields: the data's fault, not the method's."""
    if not isinstance(error, CellFailed):
        return None
    reason = next((line for line in error.log.read_text().splitlines() if MISSING_FIELDS in line), None)
    return MissingFields(f"{error.cell.method}: {reason.strip()}") if reason else None


def summarise(results: pd.DataFrame, reference: str) -> pd.DataFrame:
    summary = aggregate(results, COLUMNS)
    ref = results[results["method"] == reference].set_index("seed")["jaccard"]
    p_values, params = [], []
    for method in summary["method"]:
        group = results[results["method"] == method]
        paired = group.set_index("seed")["jaccard"].align(ref, join="inner")
        p_values.append(float("nan") if method == reference else paired_t_test(*map(np.asarray, paired)))
        params.append(int(group["params"].iloc[0]))
    return summary.assign(p_vs_reference=p_values, params=params)


def markdown(summary: pd.DataFrame, data: str, seeds: list[int], reference: str) -> str:
    lines = [
        f"# medrec leaderboard — {data}",
        "",
        f"Bootstrap protocol (10 × 80 % of test patients) per run; mean ± sample std over seeds {seeds}. "
        f"p: paired t-test of Jaccard against {reference} over the same seeds.",
        "",
        "| method | Jaccard | F1 | PRAUC | DDI rate | avg drugs | p vs ref "
        "| s/epoch | infer s | peak RSS MB | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples(index=False):
        d = r._asdict()

        def pm(key, digits=4, d=d):
            return f"{d[key]:.{digits}f} ± {d[key + '_std']:.{digits}f}"

        p = "–" if np.isnan(d["p_vs_reference"]) else f"{d['p_vs_reference']:.3g}"
        lines.append(
            f"| {d['method']} | {pm('jaccard')} | {pm('f1')} | {pm('prauc')} | {pm('ddi_rate')} | "
            f"{pm('avg_drugs', 2)} | {p} | {d['epoch_seconds']:.2f} | {d['infer_seconds']:.2f} | "
            f"{d['peak_rss_mb']:.0f} | {d['params']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_safety(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in summary.itertuples(index=False):
        ax.errorbar(r.ddi_rate, r.jaccard, xerr=r.ddi_rate_std, yerr=r.jaccard_std, fmt="o", capsize=3, label=r.method)
    ax.set_xlabel("DDI rate of recommended sets (lower is safer)")
    ax.set_ylabel("Jaccard (higher is more accurate)")
    ax.set_title("Accuracy vs safety (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_validation_curves(out: Path, methods: list[str], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in methods:
        logs = sorted((out / method / f"seed{seed}" / "logs").rglob("metrics.csv"))
        if not logs:
            continue
        frame = pd.read_csv(logs[-1])
        if "val_jaccard" not in frame:
            continue
        curve = frame.dropna(subset=["val_jaccard"]).groupby("epoch")["val_jaccard"].last()
        ax.plot(curve.index + 1, curve.values, marker=".", label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Jaccard")
    ax.set_title(f"Validation Jaccard per epoch (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_gamma_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["gamma"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([r["ddi_rate"] for r in rows], [r["jaccard"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"γ={r['gamma']:.2f}", (r["ddi_rate"], r["jaccard"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("output DDI rate")
    ax.set_ylabel("Jaccard")
    ax.set_title("SafeDrug controllability: target DDI γ")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    out = Path(opts.out)
    configs = opts.configs or default_configs()
    grid = cells(configs, opts)
    outcomes = run_grid(grid, out, jobs=opts.jobs)
    skipped = {}
    for cell, outcome in outcomes.items():
        if isinstance(outcome, Exception):
            reason = missing_fields(outcome)
            if reason is None:
                raise outcome
            skipped.setdefault(cell.method, str(reason))
    for reason in skipped.values():
        print(f"leaderboard: skipped {reason}", file=sys.stderr)
    results = results_frame(outcomes)
    if results.empty:
        raise SystemExit("leaderboard: no method ran on these data")
    results.to_csv(out / "runs.csv", index=False)
    methods = [Path(c).stem for c in configs if Path(c).stem not in skipped]
    reference = opts.reference or ("safedrug" if "safedrug" in methods else methods[0])
    summary = summarise(results, reference)
    summary.to_csv(out / "summary.csv", index=False)
    data_name = Path(opts.data).name if opts.data else "synthetic"
    notes = "".join(f"\nSkipped {reason}\n" for reason in skipped.values())
    provenance = Provenance.capture("benchmarks/leaderboard.py", argv, config=sorted(c.hash for c in grid))
    text = write_markdown(out / "report.md", markdown(summary, data_name, opts.seeds, reference) + notes, provenance)
    plot_accuracy_vs_safety(summary, out / "jaccard_vs_ddi.png")
    plot_validation_curves(out, list(summary["method"]), opts.seeds[0], out / "validation_curves.png")
    if opts.gamma_report:
        gamma = json.loads(Path(opts.gamma_report).read_text())
        plot_gamma_curve(gamma["rows"] if isinstance(gamma, dict) else gamma, out / "safedrug_gamma.png")
    print(text)
    return summary


if __name__ == "__main__":
    main()

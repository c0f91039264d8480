"""Ablation table: a config as it is, and with one ingredient removed per row, on validation and test.

    python benchmarks/ablation.py --config configs/updater.yaml --data <folder> --out <dir> \
        --ablation "no members: --model.init_args.members=1" \
        --ablation "no history: --model.init_args.history=false" [--seeds 42] [--jobs 2]

Every row is one :mod:`benchmarks.grid` cell per seed (``benchmarks/run.py`` in its own process,
``<out>/<row>/seed<s>``, the full config in ``<out>/<config stem>/seed<s>`` as leaderboard.py
names it; finished cells are reused), the full config first. ``<out>/ablation.md``
starts with the command and commit and gives, per row, the best checkpoint's validation Jaccard
(what the row was selected on) and the test figures (bootstrap means), each averaged over the
seeds, with the change against the full config.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.grid import QUIET, Cell, run_grid  # noqa: E402
from benchmarks.provenance import Provenance, write_markdown  # noqa: E402
from datamodules.errors import run_reporting_errors  # noqa: E402

FULL = "full"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", default=None, help="data root; default the synthetic cohort")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="'NAME: OVERRIDES'",
        help="a row: its name, a colon, then the LightningCLI overrides that remove the ingredient",
    )
    opts = parser.parse_args(argv)
    opts.rows = {FULL: ()}
    for text in opts.ablation:
        name, _, overrides = text.partition(":")
        options = tuple(shlex.split(overrides))
        if not name.strip() or not options or not all(o.startswith("--") for o in options):
            parser.error(f"--ablation {text!r}: write 'NAME: --key=value [--key=value ...]'")
        if name.strip() in opts.rows:
            parser.error(f"--ablation {text!r}: the name {name.strip()!r} is taken")
        opts.rows[name.strip()] = options
    return opts


def row_folder(name: str, config: str) -> str:
    """The full row is the config's own cell (``<stem>/seed<s>``, as leaderboard.py names it, so a
    leaderboard run into the same ``--out`` is reused); an ablation's folder is its name."""
    return Path(config).stem if name == FULL else re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def cells(opts: argparse.Namespace) -> list[Cell]:
    rows = opts.rows.items()
    return [
        Cell(
            name,
            opts.config,
            seed,
            opts.data,
            opts.epochs,
            (*QUIET, *overrides),
            f"{row_folder(name, opts.config)}/seed{seed}",
        )
        for name, overrides in rows
        for seed in opts.seeds
    ]


def table(outcomes: dict, opts: argparse.Namespace) -> str:
    import numpy as np

    keys = ("val_jaccard", "jaccard", "f1", "prauc", "ddi_rate", "avg_drugs")
    means = {}
    for cell, result in outcomes.items():
        if isinstance(result, Exception):
            raise result
        means.setdefault(cell.method, []).append([result[k] for k in keys])
    means = {name: np.mean(values, axis=0) for name, values in means.items()}
    full = means[FULL]
    lines = [
        f"Seeds {opts.seeds}; validation Jaccard of the best checkpoint, test figures as bootstrap means; "
        "Δ = row − full.",
        "",
        "| row | overrides | val Jaccard | Δ val | test Jaccard | Δ test | F1 | PRAUC | DDI rate | avg drugs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    overrides = {name: " ".join(f"`{o}`" for o in options) for name, options in opts.rows.items()}
    overrides[FULL] = "(config as it is)"
    for name in opts.rows:  # the rows in the order given, whatever order the cells finished in
        m = means[name]
        delta_val = "–" if name == FULL else f"{m[0] - full[0]:+.4f}"
        delta_test = "–" if name == FULL else f"{m[1] - full[1]:+.4f}"
        lines.append(
            f"| {name} | {overrides[name]} | {m[0]:.4f} | {delta_val} | {m[1]:.4f} | {delta_test} | {m[2]:.4f} | "
            f"{m[3]:.4f} | {m[4]:.4f} | {m[5]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    out = Path(opts.out)
    grid = cells(opts)
    outcomes = run_grid(grid, out, jobs=opts.jobs)
    provenance = Provenance.capture("benchmarks/ablation.py", argv, config=sorted(c.hash for c in grid))
    text = write_markdown(out / "ablation.md", table(outcomes, opts), provenance)
    print(text)
    return text


if __name__ == "__main__":  # a bad option, data folder or checkpoint: one error line, exit 2
    run_reporting_errors("benchmarks/ablation.py", main)

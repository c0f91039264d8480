"""SafeDrug's DDI controllability (paper Table 4): train at several target DDI rates γ and compare.

    python benchmarks/safedrug_gamma.py --data ../shared/data/mimic3-safedrug --out /tmp/sd/gamma \
        [--gammas 0.0 0.02 0.04 0.06 0.08] [--config configs/safedrug.yaml] [--epochs N] [--seed S] \
        [LightningCLI overrides ...]

Every γ is one ``benchmarks/run.py`` run in its own process (``<out>/gamma-<γ>/``) of the
config as it is plus ``--ddi_controller.init_args.target_ddi=<γ>`` (its ``results.json`` records
both; the config's ``ddi_controller`` must be a ``PIDDDIController``). The script then writes
``<out>/gamma.md`` (one row per γ: test figures and whether the output DDI stays within
``--tolerance`` of γ), ``<out>/gamma.json`` (the same rows, for ``leaderboard.py --gamma-report``) and
``<out>/gamma.png`` (Jaccard against output DDI rate). A γ whose ``results.json`` exists is
not trained again, so an interrupted sweep resumes and disjoint ``--gammas`` lists can run in
parallel into one ``--out``; ``--report-only`` rebuilds the reports from finished runs. The
plot needs matplotlib (``pip install medrec[bench]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.grid import Cell, run_grid  # noqa: E402
from benchmarks.provenance import Provenance, write_json, write_markdown  # noqa: E402

CONTROLLER = "callbacks.PIDDDIController"
DEFAULT_GAMMAS = (0.0, 0.02, 0.04, 0.06, 0.08)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "safedrug.yaml"))
    parser.add_argument("--data", default=None, help="data root; default the synthetic cohort")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gammas", type=float, nargs="+", default=list(DEFAULT_GAMMAS))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=0.01, help="acceptable output DDI above γ")
    parser.add_argument("--report-only", action="store_true", help="only rebuild gamma.md / gamma.png")
    return parser.parse_known_args(argv)


def check_controller(config: Path) -> None:
    """The γ grid steers SafeDrug's PID controller: refuse a config whose ``ddi_controller`` is another."""
    controller = (yaml.safe_load(config.read_text()) or {}).get("ddi_controller") or {}
    if controller.get("class_path") != CONTROLLER:
        raise SystemExit(f"{config}: its ddi_controller must be {CONTROLLER} to set γ, found {controller or None}")


def target_option(gamma: float) -> str:
    return f"--ddi_controller.init_args.target_ddi={gamma:g}"


def run_dir(out: Path, gamma: float) -> Path:
    return out / f"gamma-{gamma:.2f}"


def cells(opts: argparse.Namespace, overrides: list[str]) -> list[Cell]:
    """One grid cell per γ, in ``<out>/gamma-<γ>/``; the γ option last, so it wins over an override's."""
    config = str(Path(opts.config).resolve())
    check_controller(Path(config))
    return [
        Cell(
            f"gamma-{g:.2f}",
            config,
            opts.seed,
            opts.data,
            opts.epochs,
            (*overrides, target_option(g)),
            run_dir(Path(), g).name,
        )
        for g in opts.gammas
    ]


def train(opts: argparse.Namespace, overrides: list[str]) -> None:
    """Runs every γ not finished with these options (an interrupted sweep resumes); stops at a failed one."""
    for result in run_grid(cells(opts, overrides), opts.out).values():
        if isinstance(result, Exception):
            raise result


def collect(out: Path, gammas: list[float]) -> list[dict]:
    rows = []
    for gamma in sorted(gammas):  # the table and the curve run along γ whatever the training order
        path = run_dir(out, gamma) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run without --report-only first")
        rows.append({"gamma": gamma, **json.loads(path.read_text())})
    return rows


def markdown(rows: list[dict], tolerance: float) -> str:
    lines = [
        "| target γ | DDI rate | Jaccard | F1 | PRAUC | avg drugs | DDI ≤ γ + " + f"{tolerance:g} | s/epoch | epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if r["ddi_rate"] <= r["gamma"] + tolerance else "no"
        lines.append(
            f"| {r['gamma']:.2f} | {_pm(r, 'ddi_rate')} | {_pm(r, 'jaccard')} | {_pm(r, 'f1')} | "
            f"{_pm(r, 'prauc')} | {r['avg_drugs']:.2f} | {ok} | {r['epoch_seconds']:.1f} | {r['epochs']} |"
        )
    return "\n".join(lines) + "\n"


def _pm(row: dict, key: str) -> str:
    std = row.get(f"{key}_std")
    return f"{row[key]:.4f} ± {std:.4f}" if std is not None else f"{row[key]:.4f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ddi = [r["ddi_rate"] for r in rows]
    jac = [r["jaccard"] for r in rows]
    ax.errorbar(ddi, jac, xerr=[r["ddi_rate_std"] for r in rows], yerr=[r["jaccard_std"] for r in rows], fmt="o-")
    for r in rows:
        ax.annotate(f"γ={r['gamma']:.2f}", (r["ddi_rate"], r["jaccard"]), textcoords="offset points", xytext=(5, -10))
    ax.set_xlabel("output DDI rate (test)")
    ax.set_ylabel("Jaccard (test)")
    ax.set_title("SafeDrug: accuracy vs DDI across target γ")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, overrides = parse_args(argv)
    out = Path(opts.out)
    if not opts.report_only:
        train(opts, overrides)
    rows = collect(out, opts.gammas)
    provenance = Provenance.capture(
        "benchmarks/safedrug_gamma.py", argv, config=sorted(c.hash for c in cells(opts, overrides))
    )
    write_json(out / "gamma.json", rows, provenance)  # leaderboard.py --gamma-report reads its rows
    plot(rows, out / "gamma.png")
    print(write_markdown(out / "gamma.md", markdown(rows, opts.tolerance), provenance))
    return rows


if __name__ == "__main__":
    main()

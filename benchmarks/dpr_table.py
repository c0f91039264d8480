"""DPR's comparison table: DPR-WG, DPR-AG, the NCF / NN / structure-only GNN baselines and ablations.

    python benchmarks/dpr_table.py --out <dir> [--data <folder>] [--configs dpr_wg ncf ...]
        [--epochs N] [--variants] [--threads T] [-- CLI overrides for every run]

Each configuration is one :mod:`benchmarks.grid` cell: trained and tested by ``benchmarks/run.py``
in its own process (so peak RSS is per method) in ``<dir>/<name>/``, reused when its
``results.json`` has the cell's config hash (an interrupted table resumes). The table reports
the bootstrap means of precision, recall, F1 (DPR's metrics), Jaccard and the DDI rate (the
other methods' metrics), seconds per training epoch, test seconds and peak RSS, and is written
to ``<dir>/dpr_table.md`` (rows also in ``<dir>/dpr_table.json``; both start with the
provenance: command, commit, config hash). ``--variants`` adds DPR-WG runs with 1 GNN layer,
5 negative packages and co-occurrence threshold 0.05. ``--threads`` sets the intra-op threads of
every run (train.py's ``--threads``; DPR's many small graph ops run best with 1 on a busy
2-core machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.grid import Cell, run_grid  # noqa: E402
from benchmarks.provenance import Provenance, write_json, write_markdown  # noqa: E402

MAIN = ["dpr_wg", "dpr_ag", "dpr_ag_drug_mask", "ncf", "dpr_nn", "dpr_gnn"]
ABLATIONS = ["dpr_wg_no_context", "dpr_wg_no_type", "dpr_ag_no_mask", "dpr_ag_no_type"]
VARIANTS = {
    "dpr_wg_layers1": ("dpr_wg", ["--model.init_args.num_layers=1"]),
    "dpr_wg_neg5": ("dpr_wg", ["--data.init_args.negative_packages=5"]),
    "dpr_wg_threshold0.05": ("dpr_wg", ["--data.init_args.cooccurrence_threshold=0.05"]),
}
LABELS = {
    "dpr_wg": "DPR-WG",
    "dpr_ag": "DPR-AG",
    "dpr_ag_drug_mask": "DPR-AG, mask on the drug embeddings",
    "ncf": "NCF (top-K drugs)",
    "dpr_nn": "NN (nearest patient's package)",
    "dpr_gnn": "GNN (structure only)",
    "dpr_wg_no_context": "WG-Context (no impact factor)",
    "dpr_wg_no_type": "WG-Type (no interaction types)",
    "dpr_ag_no_mask": "AG-Mask (no mask layer)",
    "dpr_ag_no_type": "AG-Type (no type loss)",
    "dpr_wg_layers1": "DPR-WG, 1 GNN layer",
    "dpr_wg_neg5": "DPR-WG, 5 negatives",
    "dpr_wg_threshold0.05": "DPR-WG, p threshold 0.05",
}
HEADER = (
    "| method | precision | recall | F1 | Jaccard | DDI rate | avg drugs | s/epoch | epochs | test s "
    "| peak RSS MB | params |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def plan(opts: argparse.Namespace, overrides: list[str]) -> list[Cell]:
    """One grid cell per table row: (row name, config name, extra overrides)."""
    rows = [(name, name, []) for name in (opts.configs or MAIN + ABLATIONS)]
    if opts.variants:
        rows += [(name, base, extra) for name, (base, extra) in VARIANTS.items()]
    common = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    common += [f"--threads={opts.threads}"] if opts.threads else []
    return [
        Cell(
            method=name,
            config=str(ROOT / "configs" / f"{config}.yaml"),
            data=opts.data,
            epochs=opts.epochs,
            overrides=(*common, *extra, *overrides),
        )
        for name, config, extra in rows
    ]


def _pm(r: dict, key: str) -> str:
    value, std = r.get(key), r.get(f"{key}_std")
    return "–" if value is None else (f"{value:.4f} ± {std:.4f}" if std is not None else f"{value:.4f}")


def row(r: dict) -> str:
    eps = r.get("epoch_seconds")
    return (
        f"| {r['label']} | {_pm(r, 'precision')} | {_pm(r, 'recall')} | {_pm(r, 'f1')} | {_pm(r, 'jaccard')} | "
        f"{_pm(r, 'ddi_rate')} | {r['avg_drugs']:.2f} | {'–' if eps is None else f'{eps:.1f}'} | {r['epochs']} | "
        f"{r['infer_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['params']:,} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None, help="data root; default: the synthetic cohort")
    parser.add_argument("--configs", nargs="*", default=None, help="config names (default: main + ablations)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--variants", action="store_true", help="add the layer / negatives / threshold runs")
    parser.add_argument("--threads", type=int, default=None)
    opts, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    out = Path(opts.out)
    cells = plan(opts, overrides)
    rows = []
    for cell, result in run_grid(cells, out).items():
        if isinstance(result, Exception):
            raise result
        rows.append({**result, "name": cell.method, "label": LABELS.get(cell.method, cell.method)})
    provenance = Provenance.capture("benchmarks/dpr_table.py", argv, config=[c.hash for c in cells])
    write_json(out / "dpr_table.json", rows, provenance)
    data = Path(opts.data).name if opts.data else "synthetic"
    table = f"DPR table on {data} (bootstrap 10 × 80 % of the test patients)\n\n" + HEADER
    table += "\n".join(row(r) for r in rows) + "\n"
    print(write_markdown(out / "dpr_table.md", table, provenance))
    return rows


if __name__ == "__main__":
    main()

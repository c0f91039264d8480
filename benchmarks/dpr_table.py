"""DPR's comparison table: DPR-WG, DPR-AG, the NCF / NN / structure-only GNN baselines and ablations.

    python benchmarks/dpr_table.py --out <dir> [--data <folder>] [--configs a.yaml b.yaml ...]
        [--epochs N] [--variants] [--threads T] [-- CLI overrides for every run]

Each configuration is trained and tested by ``benchmarks/run.py`` in its own process (so peak
RSS is per method); the table reports the bootstrap means of precision, recall, F1 (DPR's
metrics), Jaccard and the DDI rate (the other methods' metrics), seconds per training epoch,
test seconds and peak RSS, and is written to ``<dir>/dpr_table.md`` (rows also in
``<dir>/dpr_table.json``). ``--variants`` adds DPR-WG runs with 1 GNN layer, 5 negative
packages and co-occurrence threshold 0.05. ``--threads`` sets the intra-op threads of every run
(OMP_NUM_THREADS; DPR's many small graph ops run best with 1 on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def run_one(name: str, config: str, extra: list[str], opts, overrides: list[str]) -> dict:
    out = Path(opts.out) / name
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        "--out",
        str(out),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if opts.data:
        cmd += ["--data", opts.data]
    if opts.epochs:
        cmd += ["--epochs", str(opts.epochs)]
    env = dict(os.environ)
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    start = time.perf_counter()
    with open(Path(opts.out) / f"{name}.log", "w") as log:
        subprocess.run(cmd + extra + overrides, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    results = json.loads((out / "results.json").read_text())
    results.update({"name": name, "label": LABELS.get(name, name), "wall_seconds": time.perf_counter() - start})
    return results


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None, help="data root; default: the synthetic cohort")
    parser.add_argument("--configs", nargs="*", default=None, help="config names (default: main + ablations)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--variants", action="store_true", help="add the layer / negatives / threshold runs")
    parser.add_argument("--threads", type=int, default=None)
    opts, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    plan = [(name, name, []) for name in (opts.configs or MAIN + ABLATIONS)]
    if opts.variants:
        plan += [(name, base, extra) for name, (base, extra) in VARIANTS.items()]
    rows = []
    for name, config, extra in plan:
        rows.append(run_one(name, config, extra, opts, overrides))
        print(row(rows[-1]), flush=True)
        (Path(opts.out) / "dpr_table.json").write_text(json.dumps(rows, indent=1))
    data = Path(opts.data).name if opts.data else "synthetic"
    table = f"DPR table on {data} (bootstrap 10 × 80 % of the test patients)\n\n" + HEADER
    table += "\n".join(row(r) for r in rows) + "\n"
    (Path(opts.out) / "dpr_table.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()

"""Scale benchmark of the raw-MIMIC ETL on a synthetic MIMIC-IV-layout folder.

    python benchmarks/etl_scale.py --work /tmp/medrec-etl-scale            # >= 20 M labevents, >= 3 M prescriptions
    python benchmarks/etl_scale.py --work /tmp/etl-small --patients 300 --copies 1 --lab-rows-per-visit 20

1. generates a synthetic cohort and writes it as raw MIMIC-IV tables (``benchmarks.synthetic_raw``;
   ``.csv.gz``) with the mapping files, unless ``--work/raw`` already holds that set;
2. runs ``python -m datamodules.mimic <raw> --out <work>/cohort --force true`` in a child process
   and measures its wall time and peak RSS (``getrusage`` of the child, which includes the
   interpreter and torch that ``import datamodules`` pulls in);
3. runs it again without ``--force``: the cohort is reused from the cache key (input files +
   options) and only loaded;
4. writes ``<work>/results.json`` and prints a Markdown table, with the load average
   (``os.getloadavg``) before and after: the figures depend on what else the machine runs.

Every generated file stays under ``--work`` (never in the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.provenance import Provenance, options_config, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/medrec-etl-scale", help="folder for raw tables, cohort, results")
    parser.add_argument("--patients", type=int, default=4000, help="synthetic patients sampled")
    parser.add_argument("--copies", type=int, default=11, help="each patient written this many times")
    parser.add_argument("--lab-rows-per-visit", type=int, default=195, help="normal LABEVENTS rows per visit")
    parser.add_argument("--rx-rows-per-drug", type=int, default=3, help="PRESCRIPTIONS rows per visit and drug")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the raw tables even if present")
    return parser.parse_args(argv)


def generate(args: argparse.Namespace, raw: Path) -> dict:
    from benchmarks.synthetic_raw import RawManifest, RawSpec, write_raw_mimic
    from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort

    spec = RawSpec(
        layout="mimic4",
        copies=args.copies,
        prescription_rows_per_drug=args.rx_rows_per_drug,
        lab_rows_per_visit=args.lab_rows_per_visit,
    )
    wanted = {"patients": args.patients, "raw": spec.__dict__}
    if not args.regenerate and (raw / "synthetic_raw.json").is_file():
        manifest = RawManifest.load(raw)
        if manifest.spec == spec.__dict__ and len(manifest.patients) == args.patients:
            return {"rows": manifest.rows, "seconds": None, "reused": True, **wanted}
    started = time.perf_counter()
    cohort = generate_synthetic_cohort(SyntheticSpec(patients=args.patients, seed=0))
    sampled = time.perf_counter() - started
    manifest = write_raw_mimic(cohort, raw, spec)
    return {
        "rows": manifest.rows,
        "sample_seconds": round(sampled, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "reused": False,
        **wanted,
    }


def run_etl(raw: Path, out: Path, memory_limit: str, force: bool) -> dict:
    """One ``python -m datamodules.mimic`` child: wall seconds and the child's peak RSS."""
    command = [
        sys.executable,
        "-m",
        "datamodules.mimic",
        str(raw),
        "--out",
        str(out),
        "--quiet",
        "true",
        "--memory_limit",
        memory_limit,
    ]
    if force:
        command += ["--force", "true"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ETL failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024) if peak_kb > before else None}


def import_seconds() -> float:
    """What ``import datamodules`` (torch, lightning) costs a fresh interpreter here."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import datamodules.mimic.etl"], cwd=ROOT, check=True)
    return round(time.perf_counter() - started, 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work)
    raw, out = work / "raw", work / "cohort"
    load_before = os.getloadavg()
    generated = generate(args, raw)
    rows = generated["rows"]
    how = "reused" if generated["reused"] else f"written in {generated['seconds']} s"
    print(f"raw tables ({how}): {rows}")

    first = run_etl(raw, out, args.memory_limit, force=True)
    report = json.loads((out / "etl.json").read_text())["report"]
    second = run_etl(raw, out, args.memory_limit, force=False)
    started = time.perf_counter()
    from datamodules.cohort import Cohort

    Cohort.load(out)
    in_process_load = time.perf_counter() - started
    imports = import_seconds()
    load_after = os.getloadavg()

    input_rows = sum(
        rows[t] for t in ("patients", "admissions", "diagnoses", "procedures", "prescriptions", "labevents")
    )
    results = {
        "input_rows": input_rows,
        "labevents_rows": rows["labevents"],
        "prescriptions_rows": rows["prescriptions"],
        "etl_wall_seconds": first["wall_seconds"],
        "etl_inner_seconds": report["seconds"],
        "rows_per_second": round(input_rows / first["wall_seconds"]),
        "labevents_rows_per_second": round(rows["labevents"] / first["wall_seconds"]),
        "peak_rss_mb": first["peak_rss_mb"],
        "cached_run_wall_seconds": second["wall_seconds"],
        "cached_cohort_load_seconds": round(in_process_load, 2),
        "python_import_seconds": imports,
        "cohort": report["cohort"],
        "steps": report["steps"],
        "generation": generated,
        "memory_limit": args.memory_limit,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }
    argv = sys.argv[1:] if argv is None else list(argv)
    provenance = Provenance.capture("benchmarks/etl_scale.py", argv, config=options_config(args, leave_out=("work",)))
    write_json(work / "results.json", results, provenance)
    print(
        "| input rows | labevents | prescriptions | ETL wall s | rows/s | peak RSS MB | cached run s "
        "| cohort load s | load avg (1/5/15 min) before -> after |\n|---|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {input_rows:,} | {rows['labevents']:,} | {rows['prescriptions']:,} | {first['wall_seconds']} "
        f"| {results['rows_per_second']:,} | {first['peak_rss_mb']} | {second['wall_seconds']} "
        f"| {results['cached_cohort_load_seconds']} | {results['load_average_before']} -> "
        f"{results['load_average_after']} |"
    )
    print(f"cohort: {report['cohort']}")
    print(
        f"(a fresh interpreter spends {imports} s importing torch/lightning via datamodules; results in "
        f"{work / 'results.json'})"
    )
    return results


if __name__ == "__main__":
    main()

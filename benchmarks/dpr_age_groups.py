"""Who learnt the personalised-interaction rule: recommendations split by patient age.

    python benchmarks/dpr_age_groups.py --age 60 --baseline gnn \
        --synthetic_options '{regimens: 1000, vulnerable_age: 60, extra_ddi_pairs: 150}' \
        --predictions wg=<recs.jsonl>[,<recs.jsonl>...] gnn=<recs.jsonl>[,...] [--data <cohort folder>] [--out <dir>]

Reads the JSONL that ``train.py predict --predict_output.path`` writes (one row per test visit)
and the cohort the model was tested on (the synthetic cohort of ``--synthetic_options``, or
``--data``). Per prediction file and age group (recorded age < ``--age`` / ≥ ``--age``): visit F1
against the recorded package, the share of visits whose package is matched exactly, and the
share whose recommendation holds an adverse (DDI) pair, beside the same share in the recorded
packages. The last columns compare with ``--baseline`` patient by patient (F1 averaged over each
patient's visits, the shared protocol): mean difference and the paired t-test p-value.
Several comma-separated files under one name are runs of one model (training seeds) on the same
visits: each patient's F1 is averaged over the runs before the paired test, the shares over all
their rows. A cohort without ages (the SafeDrug benchmark) gets no age groups ("—").
Writes ``<out>/age_groups.md`` and ``age_groups.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from benchmarks.provenance import Provenance, options_config, write_json, write_markdown  # noqa: E402
from datamodules.cohort import Cohort  # noqa: E402
from datamodules.sources import resolve_cohort  # noqa: E402
from datamodules.visit_sequence import synthetic_spec  # noqa: E402


def visit_table(cohort: Cohort, predictions: Path, age: float) -> pd.DataFrame:
    """One row per predicted visit: patient, age group, F1, exact match, adverse pair predicted / recorded."""
    visits = cohort.visits.set_index("visit_id")
    drugs = cohort.vocab["medication"]
    adverse = {frozenset(pair) for pair in cohort.ddi_pairs}
    has_age = "age" in visits.columns

    def has_adverse(package: set[str]) -> bool:
        ordered = sorted(package)
        return any(frozenset((a, b)) in adverse for i, a in enumerate(ordered) for b in ordered[i + 1 :])

    rows = []
    for line in Path(predictions).read_text().splitlines():
        record = json.loads(line)
        if record["visit_id"] not in visits.index:
            raise ValueError(f"{predictions}: visit {record['visit_id']!r} is not in the cohort; wrong --data?")
        visit = visits.loc[record["visit_id"]]
        truth, chosen = {drugs[i] for i in visit["medications"]}, set(record["drugs"])
        hits = len(truth & chosen)
        rows.append(
            {
                "patient": visit["patient_id"],
                "visit": record["visit_id"],
                "old": bool(visit["age"] >= age) if has_age else None,
                "f1": 2 * hits / (len(truth) + len(chosen)) if hits else 0.0,
                "exact": chosen == truth,
                "adverse": has_adverse(chosen),
                "adverse_recorded": has_adverse(truth),
            }
        )
    if not rows:
        raise ValueError(f"{predictions} holds no recommendation")
    return pd.DataFrame(rows)


def runs_table(cohort: Cohort, paths: Path | list[Path], age: float) -> pd.DataFrame:
    """``visit_table`` of every run of one model, with a ``run`` column; the runs must cover the same visits."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    tables = [visit_table(cohort, path, age).assign(run=i) for i, path in enumerate(paths)]
    for path, table in zip(paths[1:], tables[1:]):
        if sorted(table["visit"]) != sorted(tables[0]["visit"]):
            raise ValueError(f"{path} and {paths[0]} do not predict the same visits")
    return pd.concat(tables, ignore_index=True)


def summarise(
    cohort: Cohort, predictions: dict[str, Path | list[Path]], age: float, baseline: str | None = None
) -> pd.DataFrame:
    """One row per model, i.e. per prediction file or group of runs (see the module docstring)."""
    if baseline is not None and baseline not in predictions:
        raise ValueError(f"--baseline {baseline!r} is none of the predictions {sorted(predictions)}")
    tables = {name: runs_table(cohort, paths, age) for name, paths in predictions.items()}
    patient_f1 = {
        name: table.groupby(["run", "patient"])["f1"].mean().groupby("patient").mean() for name, table in tables.items()
    }
    rows = []
    for name, table in tables.items():
        row = {"name": name, "visits": len(table), "patients": len(patient_f1[name]), "f1": patient_f1[name].mean()}
        for column in ("f1", "exact", "adverse", "adverse_recorded"):
            row[f"{column}_all"] = float(table[column].mean())  # visit-level, every group
        for group, part in (("young", table[table["old"].eq(False)]), ("old", table[table["old"].eq(True)])):
            row[f"visits_{group}"] = len(part)
            for column in ("f1", "exact", "adverse", "adverse_recorded"):
                row[f"{column}_{group}"] = float(part[column].mean()) if len(part) else float("nan")
        if baseline is not None and name != baseline:
            a, b = patient_f1[name].align(patient_f1[baseline], join="inner")
            if len(a) != len(patient_f1[name]) or len(b) != len(patient_f1[baseline]):
                raise ValueError(f"{name} and {baseline} were not predicted for the same patients")
            row["f1_minus_baseline"] = float((a - b).mean())
            row["p_paired"] = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def groups(row: dict, column: str) -> str:
    """``young / old`` cell ("—" for a group without visits); without ages, the overall share."""
    values = [row[f"{column}_{group}"] for group in ("young", "old")]
    if all(pd.isna(v) for v in values):
        return f"{row[f'{column}_all']:.3f} (all)"
    return " / ".join("—" if pd.isna(v) else f"{v:.3f}" for v in values)


def markdown(summary: pd.DataFrame, age: float, baseline: str | None) -> str:
    versus = f" | F1 − {baseline} | p (paired)" if baseline else ""
    lines = [
        f"| predictions | patient F1 | F1 age < {age:g} / ≥ {age:g} | exact package | adverse pair chosen "
        f"| adverse pair recorded{versus} |",
        "|---" * (6 + 2 * bool(baseline)) + "|",
    ]
    for row in summary.to_dict("records"):
        cells = [
            row["name"],
            f"{row['f1']:.4f}",
            *(groups(row, column) for column in ("f1", "exact", "adverse", "adverse_recorded")),
        ]
        if baseline:
            compared = "f1_minus_baseline" in row and pd.notna(row["f1_minus_baseline"])
            cells += [f"{row['f1_minus_baseline']:+.4f}", f"{row['p_paired']:.2g}"] if compared else ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def named_path(text: str) -> tuple[str, list[Path]]:
    name, sep, paths = text.partition("=")
    if not sep or not name or not all(paths.split(",")):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,PATH...], got {text!r}")
    return name, [Path(path) for path in paths.split(",")]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", nargs="+", type=named_path, required=True, metavar="NAME=PATH[,PATH...]")
    parser.add_argument("--age", type=float, default=60.0)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--data", default=None, help="cohort folder (default: the synthetic cohort)")
    parser.add_argument("--synthetic_options", type=yaml.safe_load, default=None)
    parser.add_argument("--synthetic_patients", type=int, default=2000)
    parser.add_argument("--synthetic_seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    spec = synthetic_spec(args.synthetic_patients, args.synthetic_seed, args.synthetic_options or {})
    cohort = resolve_cohort(args.data, synthetic=spec)
    summary = summarise(cohort, dict(args.predictions), args.age, args.baseline)
    text = markdown(summary, args.age, args.baseline)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        provenance = Provenance.capture("benchmarks/dpr_age_groups.py", argv, config=options_config(args))
        write_markdown(out / "age_groups.md", text, provenance)
        write_json(out / "age_groups.json", json.loads(summary.to_json(orient="records")), provenance)
    return summary


if __name__ == "__main__":
    main()

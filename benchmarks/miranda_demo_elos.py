"""MiranDa ELOS sanity (paper Table 2) on the open MIMIC-III demo, through the raw-table ETL.

    MEDREC_CACHE=/tmp/mc OMP_NUM_THREADS=1 python benchmarks/miranda_demo_elos.py \
        --raw ../shared/data/mimic3-demo --mappings ../shared/data/mappings --out <dir> \
        [--min-admissions 2 1] [--seed 0]

MiranDa's sanity check: the ELOS of the drug sets doctors actually recorded should be close
to the real mean length of stay of the same visits. The synthetic half is in
``benchmarks/miranda_seeds.py`` (``elos_sanity``); this script does the MIMIC-III demo half:

1. **Stand-in drug mapping.** The public ``RXCUI2atc4.csv`` is not in ``--mappings`` (see
   ``../shared/data/README.md``), so :func:`write_stand_in_rxcui2atc4` writes a file of that
   format into ``<out>`` exactly the way ``tests/test_mimic_etl.py::test_mimic3_demo`` builds
   its mapping: of the demo's 80 most frequent ``(ndc, drug)`` prescription pairs, each whose
   lower-cased drug name starts with a key of :data:`DEMO_ATC4` (18 generic names, each with
   its WHO ATC level-4 class, e.g. furosemide → C03CA) and whose NDC ``ndc2RXCUI.txt`` maps
   becomes one row ``RXCUI,ATC4,NDC,YEAR,MONTH`` (YEAR/MONTH a constant 2016/1). The result:
   43 rows, 40 NDCs, 16 names, 14 ATC3 classes; 3,416 of the 10,398 prescription rows carry a
   mapped NDC. Every other drug (lactulose, albuterol, fentanyl, ... and all rows without an
   NDC) stays unmapped and the ETL drops it, so drug sets hold only these 14 classes (8 per
   visit), not the full medication list. The mapping is per NDC, as the public one: all rows
   with a mapped NDC get its class, including 8 "Vancomycin Oral Liquid" rows that carry the
   IV vial's NDC (oral vancomycin would be A07AA, not J01XA). The one insulin NDC mapped is
   insulin glargine, so the table says A10AE (the ETL test said A10AB; same ATC3 class A10A).
   ``<out>/demo_elos.json`` lists every row with its drug name. The figures are a check of the
   pipeline on real tables, not a reproduction of the paper's numbers.
2. **ETL** (``datamodules.mimic.prepare``) with the reference rules, once per
   ``--min-admissions`` value: 2 (the reference and the demo test: 13 patients, 38 visits)
   and 1 (single-admission patients too: 82 patients, 107 visits).
3. **ELOS of the recorded drug sets** vs the real mean LOS of the same visits, with
   :class:`lightning_modules.elos.StayIndex` at MiranDa's settings (n = 5 years, K = 50,
   φ = 0.35):

   * ``split seed s``: ``miranda_seeds.elos_sanity`` as on the synthetic cohort — random
     70/15/15 patient split, the index holds the training split (training visits never
     retrieve themselves);
   * ``leave-one-visit-out``: the index holds every visit; each visit retrieves from all the
     others (the split rule for training visits, applied to the whole cohort);
   * ``leave-one-patient-out``: each patient's visits retrieve only from the other patients'
     visits (one index per left-out patient);
   * the two leave-out protocols again with ``procedures ignored`` (every visit given the same
     empty procedure set, so ``retrieve_p`` is the age window alone): a diagnostic, not
     MiranDa's rule.

   A visit gets an ELOS only when another indexed visit has exactly its procedure set and an
   age within ±5 years; on the demo almost every procedure set is unique, so coverage under
   MiranDa's rule is a few visits, which the "with ELOS" column states.

Writes ``<out>/RXCUI2atc4.csv``, ``<out>/cohort-min<m>/`` (the ETL output with its report),
``<out>/demo_elos.json`` and ``<out>/demo_elos.md``.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from benchmarks.miranda_seeds import elos_sanity, recorded_elos  # noqa: E402
from benchmarks.provenance import Provenance, options_config, write_json, write_markdown  # noqa: E402
from datamodules.cohort import Cohort  # noqa: E402
from datamodules.mimic import EtlOptions, read_etl_report  # noqa: E402
from datamodules.mimic.etl import prepare  # noqa: E402
from datamodules.visit_sequence import PatientSequences  # noqa: E402
from lightning_modules.elos import StayIndex  # noqa: E402

# The demo's most prescribed drugs, by generic name -> WHO ATC level 4 (the table of
# tests/test_mimic_etl.py::DEMO_ATC4). Matched as a prefix of the lower-cased PRESCRIPTIONS.drug;
# the mapping is per NDC, so every prescription row with a matched NDC gets the class.
DEMO_ATC4 = {
    "furosemide": "C03CA",  # sulfonamides, plain (loop diuretic)
    "sodium chloride": "B05XA",  # electrolyte solutions
    "ns": "B05XA",  # normal saline
    "potassium chloride": "A12BA",  # potassium supplements
    "magnesium sulfate": "A12CC",  # magnesium supplements
    "d5w": "B05BA",  # 5 % dextrose: parenteral nutrition, carbohydrates
    "dextrose": "B05BA",
    "heparin": "B01AB",  # heparin group
    "lr": "B05BB",  # lactated Ringer's: solutions affecting the electrolyte balance
    "vancomycin": "J01XA",  # glycopeptide antibacterials
    "morphine": "N02AA",  # natural opium alkaloids
    "calcium gluconate": "A12AA",  # calcium supplements
    "acetaminophen": "N02BE",  # anilides
    "pantoprazole": "A02BC",  # proton pump inhibitors
    "metoprolol": "C07AB",  # selective beta blockers
    "senna": "A06AB",  # contact laxatives
    # the one insulin NDC among the 80 pairs, 00088222033, is insulin glargine (long-acting, A10AE);
    # the ETL test's table says A10AB (fast-acting), which has the same ATC3 class A10A
    "insulin": "A10AE",
    "docusate": "A06AA",  # softeners, emollients
}
TOP_PAIRS = 80
PROTOCOLS = (  # name, one index per left-out patient, procedures ignored
    ("leave-one-visit-out", False, False),
    ("leave-one-patient-out", True, False),
    ("leave-one-visit-out, procedures ignored", False, True),
    ("leave-one-patient-out, procedures ignored", True, True),
)


def write_stand_in_rxcui2atc4(raw: Path, mappings: Path, out_csv: Path, top_pairs: int = TOP_PAIRS) -> dict:
    """Write a stand-in ``RXCUI2atc4.csv`` for the demo's most frequent NDCs (see the module docstring)."""
    ndc2rxcui = ast.literal_eval((mappings / "ndc2RXCUI.txt").read_text())
    rx = pd.read_csv(raw / "PRESCRIPTIONS.csv.gz", dtype=str, usecols=["ndc", "drug"])
    pairs = rx.groupby(["ndc", "drug"]).size().sort_values(ascending=False).head(top_pairs)
    rows, names, detail = [], set(), []
    for ndc, drug in pairs.index:
        name = next((k for k in DEMO_ATC4 if drug.lower().startswith(k)), None)
        if name and ndc2rxcui.get(ndc):
            rows.append((ndc2rxcui[ndc], DEMO_ATC4[name], ndc, 2016, 1))
            names.add(name)
            detail.append({"ndc": ndc, "drug": drug, "rxcui": ndc2rxcui[ndc], "atc4": DEMO_ATC4[name]})
    frame = pd.DataFrame(rows, columns=["RXCUI", "ATC4", "NDC", "YEAR", "MONTH"])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    mapped_ndcs = set(frame["NDC"])
    return {
        "path": str(out_csv),
        "pairs_considered": int(len(pairs)),
        "rows": int(len(frame)),
        "ndcs": len(mapped_ndcs),
        "rxcuis": int(frame["RXCUI"].nunique()),
        "atc3_classes": sorted({a[:4] for a in frame["ATC4"]}),
        "names_matched": sorted(names),
        "prescription_rows_with_mapped_ndc": int(rx["ndc"].isin(mapped_ndcs).sum()),
        "prescription_rows": int(len(rx)),
        "rows_detail": detail,
    }


def _figures(elos: torch.Tensor, los: torch.Tensor) -> dict:
    known = ~torch.isnan(los)
    both = known & ~torch.isnan(elos)
    covered = int(both.sum())
    return {
        "visits": int(known.sum()),
        "covered": covered,
        "coverage": covered / max(int(known.sum()), 1),
        "elos_recorded": float(elos[both].mean()) if covered else None,
        "los_same_visits": float(los[both].mean()) if covered else None,
        "los_all_visits": float(los[known].mean()),
        "mean_abs_error": float((elos[both] - los[both]).abs().mean()) if covered else None,
        "spearman": float(stats.spearmanr(elos[both], los[both]).statistic) if covered >= 3 else None,
    }


def _elos_and_los(index: StayIndex, samples: list[dict], num_medications: int, exclude_self: bool):
    found, los = recorded_elos(index, samples, num_medications, exclude_self)
    return found.elos, los


def leave_out_elos(cohort: Cohort, per_patient: bool, overrides: dict, ignore_procedures: bool = False) -> dict:
    """ELOS of every visit's recorded drugs from the other visits (or the other patients' visits).

    ``ignore_procedures`` gives every visit the same (empty) procedure set, so ``retrieve_p``
    keeps only the age window: a diagnostic, not MiranDa's rule.
    """
    samples = PatientSequences(cohort, list(dict.fromkeys(cohort.visits["patient_id"]))).samples
    if ignore_procedures:
        samples = [{**s, "procedures": [np.zeros(0, np.int64)] * len(s["procedures"])} for s in samples]
    n_proc, n_med = cohort.vocab_size("procedure"), cohort.vocab_size("medication")
    if not per_patient:
        index = StayIndex.from_sequences(SimpleNamespace(samples=samples), n_proc, n_med, **overrides)
        return _figures(*_elos_and_los(index, samples, n_med, exclude_self=True))
    elos, los = [], []
    for left_out, sample in enumerate(samples):
        others = SimpleNamespace(samples=samples[:left_out] + samples[left_out + 1 :])
        index = StayIndex.from_sequences(others, n_proc, n_med, **overrides)
        e, v = _elos_and_los(index, [sample], n_med, exclude_self=False)
        elos.append(e)
        los.append(v)
    return _figures(torch.cat(elos), torch.cat(los))


def demo_elos(
    raw: str | Path,
    mappings: str | Path,
    out: str | Path,
    min_admissions: int = 2,
    seed: int = 0,
    overrides: dict | None = None,
) -> dict:
    """Stand-in mapping -> ETL -> ELOS of the recorded drug sets vs real LOS; returns the payload."""
    raw, mappings, out = Path(raw), Path(mappings), Path(out)
    overrides = overrides or {}
    start = time.perf_counter()
    mapping = write_stand_in_rxcui2atc4(raw, mappings, out / "RXCUI2atc4.csv")
    options = EtlOptions(
        ndc2rxcui=str(mappings / "ndc2RXCUI.txt"),
        rxcui2atc4=mapping["path"],
        mappings=str(mappings),
        min_admissions=min_admissions,
    )
    cohort, folder = prepare(raw, "mimic3", options, out=out / f"cohort-min{min_admissions}")
    etl = read_etl_report(folder)
    visits = cohort.visits
    proc_sets = visits["procedures"].map(lambda v: tuple(sorted({int(c) for c in v})))
    shared = proc_sets.map(proc_sets.value_counts())
    elos = {
        f"split seed {seed}: {name}": figures for name, figures in elos_sanity(str(folder), seed, overrides).items()
    }
    for name, per_patient, ignore in PROTOCOLS:
        elos[name] = leave_out_elos(cohort, per_patient, overrides, ignore_procedures=ignore)
    return {
        "raw": str(raw),
        "mappings": str(mappings),
        "min_admissions": min_admissions,
        "seed": seed,
        "retrieval": {"age_window": 5.0, "top_k": 50, "min_similarity": 0.35, **overrides},
        "stand_in_mapping": mapping,
        "cohort_folder": str(folder),
        "etl_steps": [(s["step"], s["admissions"], s["patients"]) for s in etl["steps"]],
        "cohort": {
            "patients": int(visits["patient_id"].nunique()),
            "visits": int(len(visits)),
            "medications": cohort.vocab["medication"],
            "drugs_per_visit": float(visits["medications"].map(len).mean()),
            "distinct_procedure_sets": int(proc_sets.nunique()),
            "visits_sharing_procedure_set": int((shared > 1).sum()),
            "los_mean": float(visits["los"].mean()),
            "los_median": float(visits["los"].median()),
        },
        "elos": elos,
        "seconds": time.perf_counter() - start,
    }


def _num(value, digits=3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def report(payload: dict) -> str:
    """One Markdown section for one :func:`demo_elos` payload."""
    c, m, r = payload["cohort"], payload["stand_in_mapping"], payload["retrieval"]
    lines = [
        f"## min_admissions = {payload['min_admissions']}: {c['patients']} patients, {c['visits']} visits",
        "",
        "ETL steps (admissions/patients): " + ", ".join(f"{st} {a}/{p}" for st, a, p in payload["etl_steps"]) + ".",
        f"{len(c['medications'])} drug classes ({', '.join(c['medications'])}), {c['drugs_per_visit']:.2f} per visit; "
        f"LOS mean {c['los_mean']:.3f}, median {c['los_median']:.3f} days; {c['distinct_procedure_sets']} distinct "
        f"procedure sets, {c['visits_sharing_procedure_set']} visits share theirs with another visit.",
        f"Stand-in RXCUI2atc4.csv: {m['rows']} rows, {m['ndcs']} NDCs, {len(m['names_matched'])} names → "
        f"{len(m['atc3_classes'])} ATC3 classes; {m['prescription_rows_with_mapped_ndc']} of "
        f"{m['prescription_rows']} prescription rows carry a mapped NDC. "
        f"Retrieval n = {r['age_window']:g} years, K = {r['top_k']}, φ = {r['min_similarity']}.",
        "",
        "| protocol | visits | with ELOS | ELOS of recorded sets | real mean LOS, same visits | real mean LOS, all "
        "| Spearman ρ (ELOS, LOS) per visit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in payload["elos"].items():
        lines.append(
            f"| {name} | {s['visits']} | {s['covered']} | {_num(s['elos_recorded'])} | "
            f"{_num(s['los_same_visits'])} | {_num(s['los_all_visits'])} | {_num(s.get('spearman'), 2)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="raw MIMIC-III demo folder")
    parser.add_argument("--mappings", required=True, help="folder with ndc2RXCUI.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--min-admissions", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--seed", type=int, default=0, help="seed of the split protocol's random split")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    payloads = [demo_elos(opts.raw, opts.mappings, opts.out, m, opts.seed) for m in opts.min_admissions]
    out = Path(opts.out)
    provenance = Provenance.capture("benchmarks/miranda_demo_elos.py", argv, config=options_config(opts))
    write_json(out / "demo_elos.json", payloads, provenance)
    text = "# MiranDa ELOS sanity (paper Table 2) on the MIMIC-III demo\n\n" + "\n".join(map(report, payloads))
    print(write_markdown(out / "demo_elos.md", text, provenance))
    return payloads


if __name__ == "__main__":
    main()

"""Synthetic raw MIMIC: write a generated cohort back out as raw MIMIC-III / MIMIC-IV tables.

With the matching mapping files (``ndc2RXCUI.txt``, ``RXCUI2atc4.csv``, ``drug-atc.csv``,
TWOSIDES ``drug-DDI.csv``, ``drugbank_drugs_info.csv``) in ``<folder>/mappings/``, the raw ETL
must give back the generator's own visits (``expected_visits`` says exactly what it must
produce), which is the ETL's round-trip test; and at a chosen scale (``copies`` of every
patient, prescription rows per drug, lab rows per visit) it is the ETL's scale benchmark.

What is written, per visit of the cohort:

* an admission (admit time = the visit's time, discharge = admit + LOS to the second), the
  patient (MIMIC-III: a date of birth that reproduces the visit's age, shifted ~300 years for
  patients >= 89 as MIMIC-III does; MIMIC-IV: ``anchor_age``/``anchor_year``, 91 for >= 89);
* each diagnosis and procedure code (MIMIC-IV: ``icd_version`` 9);
* each drug class as ``prescription_rows_per_drug`` rows of a random molecule of the class,
  each molecule with two NDCs, started within the stay — plus noise rows with NDC 0 or an
  NDC the mapping does not know, which the ETL must drop;
* each abnormal lab as an out-of-range LABEVENTS row flagged ``abnormal`` (MIMIC-IV rows carry
  the reference range, so ``high``/``low`` come back; MIMIC-III ones only ``abnormal``), plus
  ``lab_rows_per_visit`` normal rows and some outpatient rows without ``hadm_id``;
* an ICU stay inside the admission.

Tables are written in chunks of visits with pyarrow, so the scale set never sits in memory.
"""

from __future__ import annotations

import gzip
import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datamodules.cohort import Cohort
from datamodules.synthetic import load_molecule_table

SECONDS_PER_DAY = 86400
YEAR_SECONDS = 365.25 * SECONDS_PER_DAY
RARE_SIDE_EFFECTS = 40  # the TWOSIDES types the reference keeps (the 40 rarest)
MANIFEST = "synthetic_raw.json"


@dataclass(frozen=True)
class RawSpec:
    """How a synthetic cohort is written as raw tables.

    Args:
        layout: ``mimic3`` (one folder, upper-case file names) or ``mimic4`` (``hosp/``, ``icu/``).
        copies: every patient is written this many times under new ids (scale without re-sampling).
        prescription_rows_per_drug: PRESCRIPTIONS rows per (visit, drug class).
        lab_rows_per_visit: normal (not abnormal) LABEVENTS rows per visit.
        noise_prescriptions: extra prescription rows, as a fraction, with NDC 0 or an unmapped NDC.
        outpatient_labs: extra LABEVENTS rows without an admission, as a fraction of visits x labs.
        upper_case_columns: MIMIC-III only: upper-case headers (the full release) or lower-case (demo).
        compress: write ``.csv.gz`` (gzip level 1) instead of ``.csv``.
        shift_old_ages: shift patients >= 89 the way MIMIC does (III: ~300 years, IV: age 91).
        chunk_visits: visits per written chunk (bounds memory).
        seed: random choices of molecules, times, lab items.
    """

    layout: Literal["mimic3", "mimic4"] = "mimic3"
    copies: int = 1
    prescription_rows_per_drug: int = 2
    lab_rows_per_visit: int = 6
    noise_prescriptions: float = 0.05
    outpatient_labs: float = 0.05
    upper_case_columns: bool = True
    compress: bool = True
    shift_old_ages: bool = True
    chunk_visits: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies < 1 or self.prescription_rows_per_drug < 1 or self.lab_rows_per_visit < 0:
            raise ValueError("copies and prescription_rows_per_drug must be >= 1, lab_rows_per_visit >= 0")


@dataclass
class RawManifest:
    """What was written: where, the id scheme, the lab items and the row counts."""

    folder: str
    spec: dict
    patients: list[str]
    visits: list[str]
    lab_items: dict[str, int]
    rows: dict[str, int] = field(default_factory=dict)
    mappings: dict[str, str] = field(default_factory=dict)

    @property
    def subject_base(self) -> int:
        return 10_000_000 if self.spec["layout"] == "mimic4" else 10_000

    @property
    def hadm_base(self) -> int:
        return 20_000_000 if self.spec["layout"] == "mimic4" else 100_000

    def save(self) -> None:
        (Path(self.folder) / MANIFEST).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: str | Path) -> RawManifest:
        return cls(**json.loads((Path(folder) / MANIFEST).read_text()))


# --- knowledge files -------------------------------------------------------------------------
class _DrugCatalogue:
    """Molecules of the cohort's drug classes with invented NDCs, RXCUIs and PubChem CIDs."""

    def __init__(self, cohort: Cohort):
        molecules = load_molecule_table()
        molecules = molecules[molecules["atc3"].isin(cohort.vocab["medication"])].reset_index(drop=True)
        self.molecules = molecules
        self.names = molecules["drug_name"].str.capitalize().to_numpy(dtype=object)
        n = len(molecules)
        self.ndc = np.array([[f"6{i:04d}{k:04d}11" for k in range(2)] for i in range(n)], dtype=object)
        self.rxcui = [str(900_000 + i) for i in range(n)]
        self.cid = [f"CID{100_000_000 + i:09d}" for i in range(n)]
        index = {code: i for i, code in enumerate(cohort.vocab["medication"])}
        order = molecules.groupby("atc3", sort=False).indices
        self.class_first = np.zeros(len(index), dtype=np.int64)
        self.class_size = np.zeros(len(index), dtype=np.int64)
        self.class_molecules = np.zeros(n, dtype=np.int64)
        flat = []
        for code, i in index.items():
            members = order.get(code, np.array([], dtype=np.int64))
            if len(members) == 0:
                raise ValueError(f"synthetic raw: drug class {code} has no molecule")
            self.class_first[i] = len(flat)
            self.class_size[i] = len(members)
            flat.extend(members)
        self.class_molecules = np.asarray(flat, dtype=np.int64)

    def write(self, folder: Path, ddi_pairs: list[tuple[str, str]], seed: int) -> dict[str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        m = self.molecules
        pairs = ", ".join(f"'{self.ndc[i, k]}': u'{self.rxcui[i]}'" for i in range(len(m)) for k in range(2))
        (folder / "ndc2RXCUI.txt").write_text("{" + pairs + "}\n")
        atc4 = [f"{code}{'ABC'[i % 3]}" for i, code in enumerate(m["atc3"])]
        rx = pd.DataFrame({"NDC": self.ndc[:, 0], "RXCUI": self.rxcui, "YEAR": 2016, "MONTH": 1, "ATC4": atc4})
        # A second row per RXCUI with another class: the reference keeps the first row only.
        decoy = rx.iloc[:5].assign(ATC4="Z99ZA")
        pd.concat([rx, decoy], ignore_index=True).to_csv(folder / "RXCUI2atc4.csv", index=False)
        with open(folder / "drug-atc.csv", "w") as fh:
            for i, code in enumerate(m["atc3"]):
                extra = ",Z99ZZ01" if i % 7 == 0 else ""  # a class outside the vocabulary: ignored
                fh.write(f"{self.cid[i]},{code}X{i % 100:02d}{extra}\n")
        self._write_twosides(folder / "drug-DDI.csv", ddi_pairs, seed)
        drugbank = pd.DataFrame(
            {
                "drugbank_id": [f"DB{i:05d}" for i in range(len(m))] + ["DB99998", "DB99999"],
                "name": list(m["drug_name"].str.lower()) + ["Unprescribedine", "Nosmilesol"],
                "type": "small molecule",
                "moldb_smiles": list(m["smiles"]) + ["CCO", ""],
            }
        )
        drugbank.to_csv(folder / "drugbank_drugs_info.csv", index=False)
        return {
            name: str(folder / name)
            for name in ("ndc2RXCUI.txt", "RXCUI2atc4.csv", "drug-atc.csv", "drug-DDI.csv", "drugbank_drugs_info.csv")
        }

    def _write_twosides(self, path: Path, ddi_pairs: list[tuple[str, str]], seed: int) -> None:
        """Adverse pairs under 40 rare side-effect types; frequent types on harmless pairs (dropped)."""
        rng = np.random.default_rng(seed)
        by_class = self.molecules.groupby("atc3").indices
        rows = []
        pairs = [p for p in ddi_pairs if p[0] in by_class and p[1] in by_class]
        for k in range(max(RARE_SIDE_EFFECTS, len(pairs)) if pairs else 0):
            a, b = pairs[k % len(pairs)]
            i, j = rng.choice(by_class[a]), rng.choice(by_class[b])
            t = k % RARE_SIDE_EFFECTS
            rows.append((self.cid[i], self.cid[j], f"C{t:07d}", f"rare effect {t}"))
        rare_max = max((sum(1 for r in rows if r[2] == f"C{t:07d}") for t in range(RARE_SIDE_EFFECTS)), default=0)
        adverse = {frozenset(p) for p in pairs}
        classes = sorted(by_class)
        for t in range(5):
            made = 0
            while made < rare_max + 3 + t:
                a, b = rng.choice(len(classes), size=2, replace=False)
                if frozenset((classes[a], classes[b])) in adverse:
                    continue
                i, j = rng.choice(by_class[classes[a]]), rng.choice(by_class[classes[b]])
                rows.append((self.cid[i], self.cid[j], f"C{900 + t:07d}", f"common effect {t}"))
                made += 1
        pd.DataFrame(rows, columns=["STITCH 1", "STITCH 2", "Polypharmacy Side Effect", "Side Effect Name"]).to_csv(
            path, index=False
        )


# --- visits in flat arrays -------------------------------------------------------------------
@dataclass
class _Flat:
    """A list column as (flat values, offsets)."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, lists, copies: int) -> _Flat:
        lengths = np.array([len(v) for v in lists], dtype=np.int64)
        values = np.concatenate([np.asarray(v, dtype=np.int64) for v in lists]) if lengths.sum() else np.zeros(0, int)
        lengths = np.tile(lengths, copies)
        values = np.tile(values, copies)
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]))

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(visit index within the chunk, value) of visits [start, stop)."""
        lo, hi = self.offsets[start], self.offsets[stop]
        lengths = np.diff(self.offsets[start : stop + 1])
        return np.repeat(np.arange(stop - start), lengths), self.values[lo:hi]


def _strings(indices: np.ndarray, dictionary) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(dictionary, pa.string())).cast(
        pa.string()
    )


def _const(value, n: int, kind=pa.string()) -> pa.Array:
    if value is None:
        return pa.nulls(n, kind)
    return _strings(np.zeros(n, dtype=np.int32), [value]) if kind == pa.string() else pa.array(np.full(n, value))


def _times(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype("datetime64[s]"))


class _Writer:
    """Streams record batches of one table into a CSV(.gz) file."""

    def __init__(self, path: Path, upper: bool, compress: bool, stack: ExitStack):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.upper = upper
        self.stream = stack.enter_context(gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb"))
        self.writer = None
        self.rows = 0

    def write(self, columns: dict[str, pa.Array]) -> None:
        names = [c.upper() if self.upper else c for c in columns]
        table = pa.table(list(columns.values()), names=names)
        if self.writer is None:
            self.writer = pacsv.CSVWriter(self.stream, table.schema)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_raw_mimic(cohort: Cohort, folder: str | Path, spec: RawSpec = RawSpec()) -> RawManifest:
    """Write ``cohort`` as raw MIMIC tables (and mapping files in ``folder/mappings``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    iv = spec.layout == "mimic4"
    upper = spec.upper_case_columns and not iv
    suffix = ".csv.gz" if spec.compress else ".csv"
    catalogue = _DrugCatalogue(cohort)
    mapping_paths = catalogue.write(folder / "mappings", cohort.ddi_pairs, spec.seed)

    visits = cohort.visits.sort_values(["patient_id", "visit_order"]).reset_index(drop=True)
    patients = list(dict.fromkeys(visits["patient_id"]))
    n_pat, n_vis, copies = len(patients), len(visits), spec.copies
    patient_index = visits["patient_id"].map({p: i for i, p in enumerate(patients)}).to_numpy()
    manifest = RawManifest(
        folder=str(folder),
        spec=asdict(spec),
        patients=patients,
        visits=visits["visit_id"].tolist(),
        lab_items={},
        mappings=mapping_paths,
    )
    subject = np.concatenate([manifest.subject_base + c * n_pat + patient_index for c in range(copies)])
    hadm = manifest.hadm_base + np.arange(n_vis * copies)
    admit = np.tile(visits["time"].to_numpy().astype("datetime64[s]").astype(np.int64), copies)
    los_s = np.tile(np.round(visits["los"].to_numpy(dtype=float) * SECONDS_PER_DAY).astype(np.int64), copies)
    disch = admit + los_s
    age = np.tile(visits["age"].to_numpy(dtype=float), copies)
    gender = np.tile(visits["gender"].to_numpy(dtype=object), copies)

    lab_names = sorted({code.split(":")[0] for code in cohort.vocab["lab"]})
    manifest.lab_items = {name: 50_800 + i for i, name in enumerate(lab_names)}
    lab_token_item = np.array([manifest.lab_items[c.split(":")[0]] for c in cohort.vocab["lab"]], dtype=np.int64)
    lab_token_dir = np.array([c.split(":")[1] for c in cohort.vocab["lab"]], dtype=object)
    all_items = np.array(sorted(manifest.lab_items.values()) or [50_800], dtype=np.int64)
    lower = (all_items - 50_800 + 1).astype(float)  # each item its own reference range [lower, lower + 10]

    flats = {col: _Flat.of(visits[col], copies) for col in ("diagnoses", "procedures", "medications", "labs")}
    vocab = cohort.vocab

    def name(stem: str) -> Path:
        """MIMIC-IV: ``hosp/admissions.csv.gz``; MIMIC-III: ``ADMISSIONS.csv.gz``."""
        return folder / ((stem.lower() if iv else stem.split("/")[-1]) + suffix)

    with ExitStack() as stack:
        out = {
            key: _Writer(name(stem), upper, spec.compress, stack)
            for key, stem in {
                "patients": "HOSP/PATIENTS",
                "admissions": "HOSP/ADMISSIONS",
                "icustays": "ICU/ICUSTAYS",
                "diagnoses": "HOSP/DIAGNOSES_ICD",
                "procedures": "HOSP/PROCEDURES_ICD",
                "prescriptions": "HOSP/PRESCRIPTIONS",
                "labevents": "HOSP/LABEVENTS",
                "d_labitems": "HOSP/D_LABITEMS",
            }.items()
        }
        _write_patients(out["patients"], subject, admit, age, gender, iv, spec.shift_old_ages)
        row_id = {"rx": 0, "lab": 0}
        for start in range(0, n_vis * copies, spec.chunk_visits):
            stop = min(start + spec.chunk_visits, n_vis * copies)
            sl = slice(start, stop)
            _write_admissions(out["admissions"], subject[sl], hadm[sl], admit[sl], disch[sl], iv, start)
            _write_icustays(out["icustays"], subject[sl], hadm[sl], admit[sl], los_s[sl], iv, start)
            for key in ("diagnoses", "procedures"):
                v, codes = flats[key].chunk(start, stop)
                _write_codes(
                    out[key],
                    subject[sl][v],
                    hadm[sl][v],
                    codes,
                    vocab["diagnosis" if key == "diagnoses" else "procedure"],
                    iv,
                )
            v, drugs = flats["medications"].chunk(start, stop)
            row_id["rx"] = _write_prescriptions(
                out["prescriptions"],
                rng,
                catalogue,
                subject[sl],
                hadm[sl],
                admit[sl],
                los_s[sl],
                v,
                drugs,
                spec,
                iv,
                row_id["rx"],
            )
            v, labs = flats["labs"].chunk(start, stop)
            row_id["lab"] = _write_labs(
                out["labevents"],
                rng,
                subject[sl],
                hadm[sl],
                admit[sl],
                los_s[sl],
                v,
                lab_token_item[labs],
                lab_token_dir[labs],
                all_items,
                lower,
                spec,
                iv,
                row_id["lab"],
            )
        items = {
            "itemid": pa.array(all_items),
            "label": pa.array(lab_names or ["none"]),
            "fluid": _const("Blood", len(all_items)),
            "category": _const("Chemistry", len(all_items)),
        }
        out["d_labitems"].write(({"row_id": pa.array(np.arange(len(all_items)) + 1)} if not iv else {}) | items)
        for writer in out.values():
            writer.close()
        manifest.rows = {key: writer.rows for key, writer in out.items()}
    manifest.save()
    return manifest


def _write_patients(out: _Writer, subject, admit, age, gender, iv: bool, shift: bool) -> None:
    first = np.unique(subject, return_index=True)[1]
    subj, t0, a0, sex = subject[first], admit[first], age[first], gender[first]
    n = len(subj)
    old = shift & (a0 >= 89)
    if iv:
        year = t0.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
        anchor_age = np.where(old, 91, np.floor(a0)).astype(np.int64)
        out.write(
            {
                "subject_id": pa.array(subj),
                "gender": pa.array(sex.astype(str)),
                "anchor_age": pa.array(anchor_age),
                "anchor_year": pa.array(year),
                "anchor_year_group": _const("2014 - 2016", n),
                "dod": pa.nulls(n, pa.string()),
            }
        )
        return
    dob = t0 - np.round(a0 * YEAR_SECONDS).astype(np.int64)
    dob = np.where(old, dob - np.int64(300 * 365.25 * SECONDS_PER_DAY), dob)
    out.write(
        {
            "row_id": pa.array(np.arange(n) + 1),
            "subject_id": pa.array(subj),
            "gender": pa.array(sex.astype(str)),
            "dob": _times(dob),
            "dod": pa.nulls(n, pa.timestamp("s")),
            "expire_flag": _const(0, n, pa.int64()),
        }
    )


def _write_admissions(out: _Writer, subject, hadm, admit, disch, iv: bool, offset: int) -> None:
    n = len(hadm)
    cols = {} if iv else {"row_id": pa.array(offset + np.arange(n) + 1)}
    cols |= {
        "subject_id": pa.array(subject),
        "hadm_id": pa.array(hadm),
        "admittime": _times(admit),
        "dischtime": _times(disch),
        "deathtime": pa.nulls(n, pa.timestamp("s")),
        "admission_type": _const("EMERGENCY", n),
        "insurance": _const("Medicare", n),
    }
    cols["race" if iv else "ethnicity"] = _strings(hadm % 3, ["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN"])
    out.write(cols)


def _write_icustays(out: _Writer, subject, hadm, admit, los_s, iv: bool, offset: int) -> None:
    n = len(hadm)
    intime = admit + np.minimum(3600, los_s // 4)
    outtime = intime + los_s // 2
    cols = {} if iv else {"row_id": pa.array(offset + np.arange(n) + 1)}
    cols |= {
        "subject_id": pa.array(subject),
        "hadm_id": pa.array(hadm),
        ("stay_id" if iv else "icustay_id"): pa.array(hadm + 10_000_000),
        "first_careunit": _const("MICU", n),
        "intime": _times(intime),
        "outtime": _times(outtime),
        "los": pa.array(np.round((outtime - intime) / SECONDS_PER_DAY, 4)),
    }
    out.write(cols)


def _write_codes(out: _Writer, subject, hadm, codes, vocab: list[str], iv: bool) -> None:
    n = len(codes)
    seq = np.ones(n, dtype=np.int64)
    if n:
        starts = np.flatnonzero(np.r_[True, hadm[1:] != hadm[:-1]])
        seq = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n])) + 1
    cols = {} if iv else {"row_id": pa.array(out.rows + np.arange(n) + 1)}
    cols |= {"subject_id": pa.array(subject), "hadm_id": pa.array(hadm), "seq_num": pa.array(seq)}
    cols["icd_code" if iv else "icd9_code"] = _strings(codes, vocab)
    if iv:
        cols["icd_version"] = _const(9, n, pa.int64())
    out.write(cols)


def _write_prescriptions(
    out, rng, cat: _DrugCatalogue, subject, hadm, admit, los_s, v, drugs, spec: RawSpec, iv: bool, row_id: int
) -> int:
    k = spec.prescription_rows_per_drug
    v, drugs = np.repeat(v, k), np.repeat(drugs, k)
    molecule = cat.class_molecules[
        cat.class_first[drugs] + rng.integers(0, 1 << 30, len(drugs)) % cat.class_size[drugs]
    ]
    ndc_index = molecule * 2 + rng.integers(0, 2, len(drugs))
    n_noise = int(round(spec.noise_prescriptions * len(drugs)))
    noise_v = rng.integers(0, len(hadm), n_noise)
    v = np.concatenate([v, noise_v])
    ndc_dictionary = list(cat.ndc.ravel()) + ["0", "99999999999"]
    ndc_index = np.concatenate([ndc_index, len(ndc_dictionary) - 2 + rng.integers(0, 2, n_noise)])
    name_dictionary = list(cat.names) + ["Noise solution"]
    name_index = np.concatenate([molecule, np.full(n_noise, len(name_dictionary) - 1)])
    n = len(v)
    if iv:
        start = admit[v] + (rng.random(n) * los_s[v]).astype(np.int64)
        stop = start + SECONDS_PER_DAY
    else:  # MIMIC-III start dates are days: within [admit day, discharge day]
        day0 = admit[v] // SECONDS_PER_DAY * SECONDS_PER_DAY
        start = day0 + rng.integers(0, los_s[v] // SECONDS_PER_DAY + 1) * SECONDS_PER_DAY
        stop = start + SECONDS_PER_DAY
    cols = {} if iv else {"row_id": pa.array(row_id + np.arange(n) + 1)}
    cols |= {"subject_id": pa.array(subject[v]), "hadm_id": pa.array(hadm[v])}
    if not iv:
        cols["icustay_id"] = pa.nulls(n, pa.int64())
    cols |= {
        ("starttime" if iv else "startdate"): _times(start),
        ("stoptime" if iv else "enddate"): _times(stop),
        "drug_type": _const("MAIN", n),
        "drug": _strings(name_index, name_dictionary),
        "ndc": _strings(ndc_index, ndc_dictionary),
        "dose_val_rx": _const("1", n),
        "route": _const("PO", n),
    }
    out.write(cols)
    return row_id + n


def _write_labs(
    out, rng, subject, hadm, admit, los_s, v, items, directions, all_items, lower, spec: RawSpec, iv: bool, row_id: int
) -> int:
    n_vis = len(hadm)
    item_pos = np.searchsorted(all_items, items)
    lo = lower[item_pos]
    value = np.where(directions == "high", lo + 15.0, np.where(directions == "low", lo * 0.5, np.nan))
    flag = np.full(len(v), "abnormal", dtype=object)
    # normal rows: random items, values inside the range; a few flagged 'delta' (not abnormal)
    fill_v = np.repeat(np.arange(n_vis), spec.lab_rows_per_visit)
    fill_pos = rng.integers(0, len(all_items), len(fill_v))
    fill_value = np.round(lower[fill_pos] + 1 + rng.random(len(fill_v)) * 8, 1)
    fill_flag = np.where(rng.random(len(fill_v)) < 0.02, "delta", None)
    n_out = int(round(spec.outpatient_labs * max(len(v), n_vis)))
    out_v = rng.integers(0, n_vis, n_out)
    out_pos = rng.integers(0, len(all_items), n_out)
    visit = np.concatenate([v, fill_v, out_v])
    item = np.concatenate([items, all_items[fill_pos], all_items[out_pos]])
    valuenum = np.concatenate([value, fill_value, lower[out_pos] + 20.0])
    flags = np.concatenate([flag, fill_flag, np.full(n_out, "abnormal", dtype=object)])
    in_stay = np.concatenate([np.ones(len(v) + len(fill_v), bool), np.zeros(n_out, bool)])
    n = len(visit)
    charttime = admit[visit] + (rng.random(n) * los_s[visit]).astype(np.int64)
    hadm_col = pa.array(np.where(in_stay, hadm[visit], 0), mask=~in_stay)
    missing = np.isnan(valuenum)
    numbers = pa.array(valuenum, mask=missing)
    value_text = pc.fill_null(pc.cast(numbers, pa.string()), "POSITIVE")
    cols = {
        ("labevent_id" if iv else "row_id"): pa.array(row_id + np.arange(n) + 1),
        "subject_id": pa.array(subject[visit]),
        "hadm_id": hadm_col,
        "itemid": pa.array(item),
        "charttime": _times(charttime),
        "value": value_text,
        "valuenum": numbers,
        "valueuom": _const("mg/dL", n),
    }
    if iv:
        pos = np.searchsorted(all_items, item)
        cols |= {"ref_range_lower": pa.array(lower[pos]), "ref_range_upper": pa.array(lower[pos] + 10.0)}
    cols["flag"] = pa.array(flags, pa.string())
    out.write(cols)
    return row_id + n


# --- what the ETL must give back ---------------------------------------------------------------
def expected_visits(cohort: Cohort, manifest: RawManifest, age_cap: float = 90.0) -> pd.DataFrame:
    """The generator's visits as the ETL (all filters off) must return them, keyed by raw ids.

    Columns: ``subject_id``, ``hadm_id``, ``copy``, ``visit_order``, ``diagnoses``, ``procedures``,
    ``medications``, ``labs`` (sets of code strings as the ETL spells them), ``los``, ``age``,
    ``gender``.
    """
    iv = manifest.spec["layout"] == "mimic4"
    visits = cohort.visits.sort_values(["patient_id", "visit_order"]).reset_index(drop=True)
    patient_index = visits["patient_id"].map({p: i for i, p in enumerate(manifest.patients)}).to_numpy()
    n_pat, n_vis = len(manifest.patients), len(visits)
    prefix = "9:" if iv else ""

    def codes(column: str, name: str) -> list[frozenset]:
        vocab = cohort.vocab[name]
        return [frozenset(prefix + vocab[i] for i in row) for row in visits[column]]

    def labs(row) -> frozenset:
        out = set()
        for i in row:
            item, direction = cohort.vocab["lab"][i].split(":")
            out.add(f"{manifest.lab_items[item]}:{direction if iv else 'abnormal'}")
        return frozenset(out)

    first_age = visits.groupby("patient_id")["age"].transform("first").to_numpy()
    old = manifest.spec["shift_old_ages"] & (first_age >= 89)
    age = np.where(old, age_cap, np.minimum(visits["age"].to_numpy(dtype=float), age_cap))
    base = pd.DataFrame(
        {
            "visit_order": visits["visit_order"].to_numpy(),
            "diagnoses": codes("diagnoses", "diagnosis"),
            "procedures": codes("procedures", "procedure"),
            "medications": [frozenset(cohort.vocab["medication"][i] for i in row) for row in visits["medications"]],
            "labs": [labs(row) for row in visits["labs"]],
            "los": visits["los"].to_numpy(dtype=float),
            "age": age,
            "gender": visits["gender"].to_numpy(),
        }
    )
    frames = []
    for c in range(manifest.spec["copies"]):
        frame = base.copy()
        frame.insert(0, "copy", c)
        frame.insert(0, "hadm_id", manifest.hadm_base + c * n_vis + np.arange(n_vis))
        frame.insert(0, "subject_id", manifest.subject_base + c * n_pat + patient_index)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)

"""Importer for the SafeDrug/GAMENet processed MIMIC-III benchmark (``records_final.pkl`` & co.).

The benchmark carries diagnoses, procedures and medications only: no time, age, labs or
length of stay. Its ``ehr_adj_final.pkl`` was built from all records (test visits included),
so it is deliberately not imported: DataModules rebuild the co-prescription graph from the
training split.

The papers of the family (GAMENet, SafeDrug, MICRON, COGNet, MoleRec, CausalMed, Carmen, ...)
release these files with variations, all accepted here:

* special tokens in a vocabulary: GAMENet's DMNC processing puts ``seperator`` and
  ``decoder_point`` first in every vocabulary, seq2seq variants put ``SOS``/``EOS`` (or
  ``<pad>``-style tokens) in the medication vocabulary. The records never use them, so they are
  dropped and the remaining codes renumbered (records and the DDI matrix alike; the matrix may
  span the full vocabulary or the codes only). A record that does use one is refused.
* SMILES from ``atc3toSMILES.pkl`` (ATC3 -> list) or, in the SafeDrug paper's release,
  ``idx2drug.pkl`` / ``idx2SMILES.pkl`` (ATC3 -> set, plus entries for the special tokens).
* files that are not read: ``data_final.pkl`` (GAMENet's pandas table of the same visits: a
  pandas pickle, which the restricted reader refuses), ``ddi_mask_H.pkl`` (medrec rebuilds the
  substructure mask from the SMILES with BRICS, so a mask of another size does not matter),
  ``ehr_adj_final.pkl`` (see above).
* visits with more than ``[diagnoses, procedures, medications]``: the first three are imported
  and one warning counts the visits whose extra fields were ignored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.cache import cache_name, file_stamp
from datamodules.cohort import Cohort, CohortError
from datamodules.knowledge import atc3_medication_names
from datamodules.safe_pickle import load_pickle

log = logging.getLogger(__name__)

BENCHMARK_FILES = ("records_final.pkl", "voc_final.pkl", "ddi_A_final.pkl")
IMPORT_VERSION = 2
"""Part of the import cache key: a release imported by an older importer (2: special tokens
dropped, idx2drug.pkl read) is imported again rather than served from the cache."""
SMILES_FILES = ("atc3toSMILES.pkl", "idx2drug.pkl", "idx2SMILES.pkl")
"""Where the molecules may be, in order of preference (the first present is read)."""

IGNORED_FILES = {
    "data_final.pkl": "a pandas table of the same visits",
    "ddi_mask_H.pkl": "medrec rebuilds the substructure mask from the SMILES",
    "ehr_adj_final.pkl": "built from all visits, test ones included; rebuilt from the training split",
}

SPECIAL_TOKENS = frozenset(
    {"seperator", "separator", "sep", "decoder_point", "pad", "padding", "sos", "eos", "bos", "start", "end"}
    | {"unk", "mask", "cls"}
)
"""Vocabulary entries that are the releases' model tokens, not codes (compared case-insensitively;
any word in ``<...>`` or ``[...]`` is one too). No ICD-9 or ATC code is spelled like these."""

_BRACKETED = re.compile(r"^(<[^<>]*>|\[[^\[\]]*\])$")

# (key in voc_final.pkl, cohort vocabulary, position in a visit)
VOCABULARIES = (("diag_voc", "diagnosis", 0), ("pro_voc", "procedure", 1), ("med_voc", "medication", 2))


def import_cache_name(folder: Path) -> str:
    """The cache entry of ``folder``'s import: its pickles' stamps and ``IMPORT_VERSION``."""
    inputs = {p.name: file_stamp(p) for p in sorted(folder.glob("*.pkl")) if p.is_file()}
    return cache_name(f"benchmark-{folder.name}", {"import": IMPORT_VERSION, "inputs": inputs})


def is_benchmark_folder(folder: str | Path) -> bool:
    return (Path(folder) / "records_final.pkl").is_file()


def is_special_token(word: object) -> bool:
    """A padding/separator/sequence token of a release's vocabulary (see ``SPECIAL_TOKENS``)."""
    text = str(word).strip()
    return text.lower() in SPECIAL_TOKENS or bool(_BRACKETED.match(text))


@dataclass
class Vocabulary:
    """One vocabulary of ``voc_final.pkl``: its codes, and where each file index goes in the cohort."""

    key: str
    codes: list[str]
    """The codes, special tokens dropped, in file order."""
    remap: list[int]
    """File index -> cohort index; -1 for a special token."""
    special: dict[int, str]
    """File index -> special token."""

    @property
    def file_size(self) -> int:
        return len(self.remap)


def _load_pickle(path: Path):
    """Any of the family's pickles, through the restricted reader: no file can run code."""
    return load_pickle(path, what="a benchmark pickle")


def _load_vocabulary(path: Path) -> dict[str, Vocabulary]:
    """voc_final.pkl: a (dill) pickle of the authors' ``Voc`` class, often stored by value with
    its code; the restricted reader keeps only the instances' ``idx2word`` dicts."""
    raw = load_pickle(path, what="the benchmark vocabulary")
    if not isinstance(raw, dict):
        raise CohortError(f"{path}: expected a dict of vocabularies, got {type(raw).__name__}")
    out = {}
    for key, name, _ in VOCABULARIES:
        if key not in raw:
            raise CohortError(f"{path}: vocabulary {key!r} missing (found {sorted(map(str, raw))})")
        idx2word = getattr(raw[key], "idx2word", None)
        if not isinstance(idx2word, dict) or sorted(idx2word) != list(range(len(idx2word))):
            raise CohortError(f"{path}: vocabulary {key!r} has no idx2word dict indexed 0..n-1")
        codes: list[str] = []
        remap: list[int] = []
        special: dict[int, str] = {}
        for i in range(len(idx2word)):
            word = str(idx2word[i])
            if is_special_token(word):
                special[i] = word
                remap.append(-1)
            else:
                remap.append(len(codes))
                codes.append(word)
        if special:
            log.info("%s: %s special token(s) %s dropped from %s", path, len(special), list(special.values()), key)
        out[name] = Vocabulary(key=key, codes=codes, remap=remap, special=special)
    return out


def _visit_codes(values, vocab: Vocabulary, where: str, path: Path) -> list[int]:
    """One visit's code list, renumbered into the cohort vocabulary; errors name the visit."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise CohortError(f"{path}: {where}: expected a list of {vocab.key} indices, got {values!r:.80}")
    out = []
    for code in values:
        if isinstance(code, (bool, np.bool_)) or not isinstance(code, (Integral, float, np.floating)):
            raise CohortError(f"{path}: {where}: {vocab.key} codes must be integer indices, got {code!r:.80}")
        if not isinstance(code, Integral):
            if not float(code).is_integer():
                raise CohortError(f"{path}: {where}: {vocab.key} codes must be integer indices, got {code!r:.80}")
        code = int(code)
        if not 0 <= code < vocab.file_size:
            name = dict((k, n) for k, n, _ in VOCABULARIES)[vocab.key]
            raise CohortError(
                f"{path}: {where}: index {code} outside the {name} vocabulary "
                f"({vocab.key} of voc_final.pkl has {vocab.file_size} entries)"
            )
        new = vocab.remap[code]
        if new < 0:
            raise CohortError(
                f"{path}: {where} lists {vocab.special[code]!r} (index {code} of {vocab.key} in voc_final.pkl), "
                "a special token of the release, not a code; medrec cannot import records that use it"
            )
        out.append(new)
    return out


def _read_visits(path: Path, records, vocab: dict[str, Vocabulary]) -> tuple[list[dict], int]:
    """records_final.pkl -> visit rows (patient i = i-th record), and how many visits had extra fields."""
    if not isinstance(records, list):
        raise CohortError(f"{path}: expected a list of patients, got {type(records).__name__}")
    rows = []
    extra = 0
    width = len(str(len(records)))
    for p, patient in enumerate(records):
        if not isinstance(patient, (list, tuple)):
            raise CohortError(f"{path}: patient {p} is a {type(patient).__name__}, expected a list of visits")
        if not patient:
            raise CohortError(f"{path}: patient {p} has no visits")
        for t, visit in enumerate(patient):
            if not isinstance(visit, (list, tuple, np.ndarray)) or len(visit) < 3:
                raise CohortError(f"{path}: patient {p} visit {t} is not [diagnoses, procedures, medications]")
            extra += len(visit) > 3
            where = f"patient {p} visit {t}"
            row = {"patient_id": f"P{p:0{width}d}", "visit_id": f"P{p:0{width}d}-{t}", "visit_order": t}
            for _, name, position in VOCABULARIES:
                row[{"diagnosis": "diagnoses", "procedure": "procedures", "medication": "medications"}[name]] = (
                    _visit_codes(visit[position], vocab[name], where, path)
                )
            rows.append(row)
    return rows, extra


def _ddi_matrix(path: Path, raw, meds: Vocabulary) -> np.ndarray:
    """ddi_A_final.pkl over the medication codes: a matrix spanning the release's full vocabulary
    (special tokens included, as GAMENet's is) loses their rows and columns."""
    try:
        ddi = np.asarray(raw, dtype=float)
    except (TypeError, ValueError):
        raise CohortError(f"{path}: expected a numeric drug x drug adjacency, got {type(raw).__name__}") from None
    n_codes, n_file = len(meds.codes), meds.file_size
    if ddi.shape == (n_file, n_file):
        keep = [i for i in range(n_file) if meds.remap[i] >= 0]
        return ddi[np.ix_(keep, keep)]
    if ddi.shape == (n_codes, n_codes):
        return ddi
    tokens = f" ({n_codes} drugs and {len(meds.special)} special tokens)" if meds.special else ""
    raise CohortError(
        f"{path}: shape {ddi.shape} does not match {n_codes} drugs: med_voc of voc_final.pkl has "
        f"{n_file} entries{tokens}"
    )


def _read_smiles(folder: Path, meds: list[str]) -> dict[str, list[str]]:
    """ATC3 -> SMILES from the first of ``SMILES_FILES`` present; {} when none is.

    A list keeps its order; a set (``idx2drug.pkl``), whose order Python does not fix, is sorted
    so the same file always gives the same molecules. Entries that are not drugs of the
    vocabulary (the special tokens, which map to ``{}``) are skipped.
    """
    path = next((folder / name for name in SMILES_FILES if (folder / name).is_file()), None)
    if path is None:
        return {}
    raw = _load_pickle(path)
    if not isinstance(raw, dict):
        raise CohortError(f"{path}: expected a dict ATC3 -> SMILES, got {type(raw).__name__}")
    wanted = set(meds)
    out: dict[str, list[str]] = {}
    for code, value in raw.items():
        if not isinstance(code, str) or code not in wanted:
            continue
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, (set, frozenset)):
            value = sorted(value, key=str)
        elif isinstance(value, dict) and not value:
            value = []
        elif not isinstance(value, (list, tuple)):
            raise CohortError(f"{path}: {code!r} maps to a {type(value).__name__}, expected a list or set of SMILES")
        out[code] = [s for s in value if isinstance(s, str)]
    return out


def read_benchmark(folder: str | Path) -> Cohort:
    """Read the benchmark pickles into a Cohort (patient i = i-th record, in file order)."""
    folder = Path(folder)
    for name in BENCHMARK_FILES:
        if not (folder / name).is_file():
            raise CohortError(f"{folder}: benchmark file {name} is missing")
    ignored = [f"{name} ({why})" for name, why in IGNORED_FILES.items() if (folder / name).is_file()]
    if ignored:
        log.info("%s: not read: %s", folder, "; ".join(ignored))
    records = _load_pickle(folder / "records_final.pkl")
    vocab = _load_vocabulary(folder / "voc_final.pkl")
    ddi = _ddi_matrix(folder / "ddi_A_final.pkl", _load_pickle(folder / "ddi_A_final.pkl"), vocab["medication"])
    rows, extra = _read_visits(folder / "records_final.pkl", records, vocab)
    if extra:
        log.warning(
            "%s: %d of %d visits carry fields beyond [diagnoses, procedures, medications]; "
            "only the first three were imported",
            folder / "records_final.pkl",
            extra,
            len(rows),
        )
    meds = vocab["medication"].codes
    smiles = _read_smiles(folder, meds)

    ii, jj = np.nonzero(np.triu(np.maximum(ddi, ddi.T), k=1))
    cohort = Cohort(
        visits=pd.DataFrame(rows),
        vocab={name: v.codes for name, v in vocab.items()} | {"lab": []},
        ddi_pairs=[(meds[i], meds[j]) for i, j in zip(ii, jj)],
        smiles={code: list(smiles.get(code, [])) for code in meds},
        # The benchmark's only relation knowledge is adverse DDI, which DPR reads as antagonism.
        relations=pd.DataFrame(
            [(meds[i], meds[j], "antagonism", "both") for i, j in zip(ii, jj)],
            columns=["drug_a", "drug_b", "relation", "direction"],
        ),
        # The pickles carry ATC3 codes only; their WHO class names come from the shipped table.
        medication_names=atc3_medication_names(meds),
        source=f"benchmark:{folder.name}",
    )
    return cohort.validate(where=str(folder))

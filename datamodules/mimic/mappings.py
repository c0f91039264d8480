"""Drug and diagnosis code maps in their public formats, and where the ETL looks for them.

NDC -> ATC3 comes either from the GAMENet/SafeDrug chain

* ``ndc2RXCUI.txt``: one Python dict literal, 11-digit NDC -> RxNorm RXCUI (string);
* ``RXCUI2atc4.csv``: CSV with header, columns include ``RXCUI`` and ``ATC4`` (plus ``NDC``,
  ``YEAR``, ``MONTH``); the first row of each RXCUI wins, as in the reference processing;

or from a plain two-column ``ndc,atc`` CSV (header optional, any ATC level of >= 4 characters).
ATC3 is the first four characters of the ATC code. GAMENet publishes the same two files as
``ndc2rxnorm_mapping.txt`` (the same dict literal, Python 2 ``u''`` strings) and
``ndc2atc_level4.csv`` (the same table; an ``ATC5`` column stands in when ``ATC4`` is absent).

Processed knowledge files of the papers' releases are read as well: SMILES from
``atc3toSMILES.pkl`` or ``idx2drug.pkl`` (dict ATC3 -> list or set of SMILES), DDI pairs from
``ddi_A_final.pkl`` (numpy adjacency) with the ``voc_final.pkl`` whose ``med_voc`` indexes it.
Pickles are read by :func:`read_third_party_pickle`, which never runs code from the file.

README section "Where each file comes from" says where each public file is published.

Mapping files are found, for each public file name, at (first hit wins):
1. the path given explicitly (option / command-line flag);
2. the folder given as the ``mappings`` option (``--mappings``);
3. the folder named by ``$MEDREC_MAPPINGS``;
4. the MIMIC folder itself, then its ``mappings/`` sub-folder.
"""

from __future__ import annotations

import ast
import csv
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from datamodules.cohort import CohortError
from datamodules.safe_pickle import RestrictedUnpickler

MAPPINGS_ENV = "MEDREC_MAPPINGS"

MAPPING_FILES: dict[str, tuple[str, ...]] = {
    # option name -> public file names (first is canonical; others are the GAMENet spellings)
    "ndc2rxcui": ("ndc2RXCUI.txt", "ndc2rxnorm_mapping.txt"),
    "rxcui2atc4": ("RXCUI2atc4.csv", "ndc2atc_level4.csv"),
    "ndc_atc": ("ndc_atc.csv", "ndc2atc.csv"),
    "drug_atc": ("drug-atc.csv",),
    "ddi": ("drug-DDI.csv",),
    "drugbank": ("drugbank_drugs_info.csv",),
    # processed files of the papers' releases, used when the raw-source file above is absent
    "smiles": ("atc3toSMILES.pkl", "idx2drug.pkl"),
    "ddi_matrix": ("ddi_A_final.pkl",),
    "ddi_vocabulary": ("voc_final.pkl",),
}

README_SECTION = 'README "Where each file comes from"'
FOLDER_OPTION = {"prepare": "--mappings DIR", "train": "--data.init_args.mappings=DIR"}


def option_hint(keys: tuple[str, ...] | list[str], options_from: str = "prepare") -> str:
    """How to hand the files of ``keys`` to medrec, in the words of the command that runs the ETL.

    ``medrec-prepare`` has one flag per file; ``train.py`` takes the folder that holds them
    (``--data.init_args.mappings``) and finds each file under its public name.
    """
    folder = FOLDER_OPTION.get(options_from, FOLDER_OPTION["prepare"])
    if options_from == "train":
        names = " / ".join(MAPPING_FILES[k][0] for k in keys)
        return (
            f"put {names} (public names) in a folder and pass {folder} (or set ${MAPPINGS_ENV}, "
            f"or place them next to the MIMIC tables); see {README_SECTION}"
        )
    flags = "/".join(f"--{k}" for k in keys)
    return f"pass {flags}, or their folder ({folder} or ${MAPPINGS_ENV}); see {README_SECTION}"


ATC3_PATTERN = re.compile(r"^[A-Z][0-9]{2}[A-Z]$")


def mapping_search_dirs(root: Path, folder: str | None = None) -> list[Path]:
    dirs = [Path(folder).expanduser()] if folder else []
    if os.environ.get(MAPPINGS_ENV):
        dirs.append(Path(os.environ[MAPPINGS_ENV]).expanduser())
    dirs += [root, root / "mappings"]
    return dirs


def find_mapping_files(
    root: Path, explicit: dict[str, str | None], folder: str | None = None
) -> dict[str, Path | None]:
    """Resolve every mapping file: explicit path (must exist), else ``folder``, $MEDREC_MAPPINGS, root."""
    found: dict[str, Path | None] = {}
    for key, names in MAPPING_FILES.items():
        given = explicit.get(key)
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise CohortError(f"mapping file {path} ({key}) does not exist")
            found[key] = path
            continue
        found[key] = None
        for where in mapping_search_dirs(root, folder):
            hit = next((where / n for n in names if (where / n).is_file()), None)
            if hit is not None:
                found[key] = hit
                break
    return found


def normalise_ndc(series: pd.Series) -> pd.Series:
    """Digits only, 11 characters (leading zeros restored), all-zero or non-numeric -> NA."""
    text = series.astype("string").str.strip().str.replace(r"\.0$", "", regex=True)
    ok = text.str.fullmatch(r"[0-9]{1,11}").fillna(False)
    text = text.where(ok).str.zfill(11)
    return text.where(text != "0" * 11)


def read_ndc2rxcui(path: Path) -> pd.DataFrame:
    try:
        mapping = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError, MemoryError) as err:
        raise CohortError(f"{path}: not a Python dict literal of NDC -> RXCUI ({type(err).__name__})") from None
    if not isinstance(mapping, dict):
        raise CohortError(f"{path}: expected a dict literal NDC -> RXCUI, got {type(mapping).__name__}")
    if not mapping:
        raise CohortError(f"{path}: the NDC -> RXCUI dict is empty ({{}}); no prescription could be mapped")
    frame = pd.DataFrame({"ndc": list(map(str, mapping)), "rxcui": [str(v).strip() for v in mapping.values()]})
    frame["ndc"] = normalise_ndc(frame["ndc"])
    frame["rxcui"] = frame["rxcui"].str.replace(r"\.0$", "", regex=True)
    return frame[frame["ndc"].notna() & (frame["rxcui"] != "")].drop_duplicates("ndc")


def read_rxcui2atc4(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CohortError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err})") from None
    # GAMENet's ndc2atc_level4.csv is the same table; some copies carry ATC5 instead of ATC4
    atc = next((c for c in ("ATC4", "ATC5", "ATC") if c in frame.columns), None)
    missing = [c for c, ok in (("RXCUI", "RXCUI" in frame.columns), ("ATC4", atc is not None)) if not ok]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing} (has {list(frame.columns)})")
    frame = frame[["RXCUI", atc]].rename(columns={"RXCUI": "rxcui", atc: "atc"})
    frame["rxcui"] = frame["rxcui"].str.strip().str.replace(r"\.0$", "", regex=True)
    frame = frame[(frame["rxcui"] != "") & (frame["atc"].str.strip() != "")]
    return frame.drop_duplicates("rxcui", keep="first")


def read_ndc_atc(path: Path) -> pd.DataFrame:
    """Two columns ``ndc,atc``; a first row whose NDC is not numeric is taken as the header."""
    try:
        frame = pd.read_csv(path, dtype=str, header=None, keep_default_na=False, usecols=[0, 1])
    except Exception as err:
        raise CohortError(f"{path}: cannot be read as a two-column ndc,atc CSV ({type(err).__name__}: {err})") from None
    frame.columns = ["ndc", "atc"]
    if len(frame) and not re.fullmatch(r"\s*[0-9.]+\s*", frame["ndc"].iloc[0]):
        frame = frame.iloc[1:]
    frame["ndc"] = normalise_ndc(frame["ndc"])
    return frame[frame["ndc"].notna()].drop_duplicates("ndc", keep="first")


def to_atc3(frame: pd.DataFrame, where: str) -> tuple[pd.DataFrame, int]:
    """Keep well-formed ATC codes, cut to ATC3; returns (ndc, atc3) and the count of malformed rows."""
    atc3 = frame["atc"].str.strip().str.upper().str[:4]
    ok = atc3.str.fullmatch(ATC3_PATTERN).fillna(False)
    out = pd.DataFrame({"ndc": frame.loc[ok, "ndc"].to_numpy(), "atc3": atc3[ok].to_numpy()})
    if out.empty:
        raise CohortError(f"{where}: maps no NDC to a valid ATC code (expected codes like 'N02BE')")
    return out, int((~ok).sum())


def ndc_to_atc3(
    files: dict[str, Path | None], explicit: dict[str, str | None], options_from: str = "prepare"
) -> tuple[pd.DataFrame, dict]:
    """The NDC -> ATC3 table and a note of which files made it.

    An explicit ``ndc_atc`` wins; otherwise the ndc2RXCUI + RXCUI2atc4 chain; otherwise a
    discovered ``ndc_atc`` file.
    """
    chain = files.get("ndc2rxcui") is not None and files.get("rxcui2atc4") is not None
    use_plain = files.get("ndc_atc") is not None and (explicit.get("ndc_atc") or not chain)
    if use_plain:
        path = files["ndc_atc"]
        table, malformed = to_atc3(read_ndc_atc(path), str(path))
        return table, {"source": str(path), "ndcs": len(table), "malformed_atc_rows": malformed}
    if chain:
        ndc = read_ndc2rxcui(files["ndc2rxcui"])
        atc = read_rxcui2atc4(files["rxcui2atc4"])
        joined = ndc.merge(atc, on="rxcui", how="inner")
        if joined.empty:
            raise CohortError(
                f"{files['rxcui2atc4']}: shares no RXCUI with {files['ndc2rxcui']} "
                f"({len(ndc)} NDCs, {len(atc)} RXCUIs): the mapping maps nothing"
            )
        table, malformed = to_atc3(joined, str(files["rxcui2atc4"]))
        return table, {
            "source": f"{files['ndc2rxcui']} + {files['rxcui2atc4']}",
            "ndcs": len(table),
            "malformed_atc_rows": malformed,
        }
    raise CohortError(missing_drug_mapping(files, options_from))


def missing_drug_mapping(files: dict[str, Path | None], options_from: str = "prepare") -> str:
    """The message for a missing NDC -> ATC mapping: which file is missing and how to supply it."""
    chain = ("ndc2rxcui", "rxcui2atc4")
    have = [str(files[k]) for k in chain if files.get(k)]
    missing = [f"{MAPPING_FILES[k][0]} (or {MAPPING_FILES[k][1]})" for k in chain if not files.get(k)]
    keys = chain if options_from == "train" else (*chain, "ndc_atc")
    return (
        f"no NDC -> ATC drug mapping found: missing {' and '.join(missing)} (found {', '.join(have) or 'neither'}); "
        f"a two-column ndc,atc CSV (ndc_atc.csv) replaces both; {option_hint(keys, options_from)}"
    )


def read_icd_map(path: Path) -> pd.DataFrame:
    """ICD-9 -> ICD-10 map: CMS GEM text (``source target flags``, whitespace) or a CSV; first target wins."""
    rows = []
    try:
        with open(path, newline="") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            reader = csv.reader(fh) if "," in sample else (line.split() for line in fh)
            for parts in reader:
                if len(parts) >= 2:
                    rows.append((parts[0].strip().replace(".", ""), parts[1].strip().replace(".", "")))
    except (OSError, UnicodeDecodeError) as err:
        raise CohortError(f"{path}: cannot be read as an ICD map ({type(err).__name__})") from None
    frame = pd.DataFrame(rows, columns=["source", "target"])
    frame = frame[(frame["target"] != "") & ~frame["target"].str.upper().isin({"NODX", "NOPCS"})]
    frame = frame.drop_duplicates("source", keep="first")
    if frame.empty:
        raise CohortError(f"{path}: maps no ICD code (expected lines 'icd9 icd10 [flags]')")
    return frame


# --- processed pickles of the papers' releases ------------------------------------------------
def read_third_party_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a file from a paper's release without running code from it.

    Only builtin containers and scalars, numpy arrays (plain or dill-recorded), and classes
    the file defines (as bare attribute records: ``voc.idx2word`` works, methods do not) are
    rebuilt; anything else raises a :class:`CohortError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh).load()  # medrec's one restricted reader (safe_pickle)
    except OSError as err:
        raise CohortError(f"{path}: cannot be read ({err.strerror or err})") from None
    except Exception as err:  # a damaged or foreign pickle fails in many ways; all mean the same here
        raise CohortError(f"{path}: cannot be read as a data pickle ({type(err).__name__}: {err})") from None


def _words(vocabulary: Any) -> list[str]:
    """Index -> code of a ``Voc``-like record or dict (``idx2word``)."""
    idx2word = getattr(vocabulary, "idx2word", None)
    if idx2word is None and isinstance(vocabulary, dict):
        idx2word = vocabulary.get("idx2word")
    if not isinstance(idx2word, dict):
        raise TypeError("no idx2word dict")
    return [str(idx2word[i]) for i in range(len(idx2word))]


def read_medication_vocabulary(path: Path) -> list[str]:
    """``voc_final.pkl`` -> the medication codes in index order (``med_voc.idx2word``)."""
    raw = read_third_party_pickle(path)
    try:
        return _words(raw["med_voc"])
    except (TypeError, KeyError) as err:
        raise CohortError(f"{path}: expected a dict with 'med_voc' holding idx2word ({err})") from None

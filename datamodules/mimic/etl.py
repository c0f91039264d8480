"""Raw MIMIC folder -> cohort folder, built once: the ETL's entry points and its cache.

``prepare_cohort`` reuses a cohort this ETL wrote when its key (ETL version, cohort format,
layout, the options that change the output, and the stamps of every input file: raw tables
and mapping files) is unchanged, else runs ``pipeline.build_cohort`` (the rules are in that
module's docstring) and writes the cohort, with ``etl.json`` (key, options, inputs, report),
atomically. Without ``out`` the cohort goes to the medrec cache (``datamodules.cache``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from datamodules.cache import default_cache_dir, digest, file_stamp
from datamodules.cohort import FORMAT_VERSION, Cohort, CohortError
from datamodules.cohort import check_replaceable as check_cohort_replaceable
from datamodules.mimic import mappings
from datamodules.mimic.options import ENGINE_FIELDS, PATH_FIELDS, EtlOptions
from datamodules.mimic.pipeline import build_cohort
from datamodules.mimic.tables import LAYOUTS, TABLES, Layout, detect_layout, find_table_file

__all__ = ["ETL_FILE", "ETL_VERSION", "EtlOptions", "build_cohort", "prepare", "prepare_cohort", "read_etl_report"]

log = logging.getLogger(__name__)

ETL_VERSION = 1
"""Bump when the ETL's output for the same inputs and options changes: cached cohorts rebuild."""

ETL_FILE = "etl.json"


def prepare_cohort(
    root: str | os.PathLike,
    layout: Literal["auto", "mimic3", "mimic4"] = "auto",
    options: EtlOptions | None = None,
    **where,
) -> Cohort:
    """The cohort of a raw MIMIC folder: reused from ``out`` (or the cache) when inputs and
    options are unchanged, else built and written atomically there (``where``: ``prepare``'s
    ``out``, ``cache_dir``, ``force``)."""
    return prepare(root, layout, options, **where)[0]


def prepare(
    root: str | os.PathLike,
    layout: Literal["auto", "mimic3", "mimic4"] = "auto",
    options: EtlOptions | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> tuple[Cohort, Path]:
    """``prepare_cohort`` that also says which folder holds the cohort."""
    options = options or EtlOptions()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CohortError(f"MIMIC folder {root} does not exist or is not a folder")
    layout = resolve_layout(root, layout)
    key, inputs = cache_key(root, layout, options)
    if out is not None:
        target = Path(out).expanduser()
    else:
        target = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{layout}-{root.name}-{key[:12]}"
    if not force and is_current(target, key):
        started = time.perf_counter()
        cohort = Cohort.load(target)
        log.info("loaded cached %s cohort %s in %.1f s", layout, target, time.perf_counter() - started)
        return cohort, target
    check_replaceable(target, source=f"{layout}:{root.name}", force=force)  # before the work
    cohort, report = build_cohort(root, layout, options)
    meta = {
        "etl_version": ETL_VERSION,
        "key": key,
        "layout": layout,
        "root": str(root.resolve()),
        "options": asdict(options),
        "inputs": inputs,
        "report": report,
    }
    cohort.save(target, force=force, extra_files={ETL_FILE: json.dumps(meta, indent=1, default=str)})
    log.info("wrote %s cohort %s (%s)", layout, target, cohort.summary())
    return cohort, target


def resolve_layout(root: Path, layout: str) -> Layout:
    if layout == "auto":
        found = detect_layout(root)
        if found is None:
            raise CohortError(
                f"{root}: no raw MIMIC tables found (expected ADMISSIONS.csv[.gz] or hosp/admissions.csv[.gz])"
            )
        return found
    if layout not in LAYOUTS:
        raise CohortError(f"unknown MIMIC layout {layout!r}; expected one of {LAYOUTS}")
    return layout  # type: ignore[return-value]


def cache_key(root: Path, layout: Layout, options: EtlOptions) -> tuple[str, dict]:
    """A digest of the ETL version, the semantic options and every input file's stamp."""
    inputs: dict[str, dict | None] = {}
    for name, spec in TABLES[layout].items():
        path = find_table_file(root, spec)
        inputs[name] = file_stamp(path) if path else None
    found = mappings.find_mapping_files(root, options.explicit_mappings, options.mappings)
    for name, path in found.items():
        inputs[name] = file_stamp(path) if path else None
    for name in ("diagnosis_icd_map", "procedure_icd_map"):
        value = getattr(options, name)
        inputs[name] = file_stamp(Path(value).expanduser()) if value else None
    # Paths enter the key as the resolved files' stamps; engine settings do not change the output.
    semantic = {k: v for k, v in asdict(options).items() if k not in ENGINE_FIELDS + PATH_FIELDS}
    payload = {"etl": ETL_VERSION, "format": FORMAT_VERSION, "layout": layout, "options": semantic, "inputs": inputs}
    return digest(payload), inputs


def is_current(folder: Path, key: str) -> bool:
    """True when ``folder`` holds a loadable cohort this ETL version wrote for ``key``."""
    try:
        meta = json.loads((folder / ETL_FILE).read_text())
        cohort_meta = json.loads((folder / "cohort.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("key") == key
        and meta.get("etl_version") == ETL_VERSION
        and cohort_meta.get("format_version") == FORMAT_VERSION
    )


def check_replaceable(target: Path, source: str | None = None, force: bool = False) -> None:
    """Only an empty folder or a cohort this ETL wrote (from ``source``) may be replaced; ``force``: any."""
    check_cohort_replaceable(target, source=source, extra_files=(ETL_FILE,), force=force)


def read_etl_report(folder: str | os.PathLike) -> dict:
    """The report stored with a cohort this ETL wrote."""
    path = Path(folder) / ETL_FILE
    if not path.is_file():
        raise CohortError(f"{folder}: no {ETL_FILE} (not written by the MIMIC ETL)")
    return json.loads(path.read_text())["report"]

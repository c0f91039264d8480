"""Turn a user's ``root`` folder (or none) into a Cohort, detecting what the folder holds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from datamodules.benchmark import BENCHMARK_FILES, import_cache_name, is_benchmark_folder, read_benchmark
from datamodules.cache import cached_cohort, default_cache_dir
from datamodules.cohort import Cohort, CohortError, is_cohort_folder
from datamodules.mimic.etl import EtlOptions, prepare_cohort
from datamodules.mimic.tables import detect_layout
from datamodules.synthetic import SyntheticSpec, synthetic_cohort

Source = Literal["auto", "cohort", "benchmark", "synthetic", "mimic3", "mimic4"]
RAW_MIMIC3_MARKERS = ("ADMISSIONS.csv", "ADMISSIONS.csv.gz", "admissions.csv", "admissions.csv.gz")


def detect_source(root: str | os.PathLike) -> str:
    root = Path(root)
    if not root.exists():
        raise CohortError(f"data root {root} does not exist")
    if not root.is_dir():
        raise CohortError(f"data root {root} is not a folder")
    if is_cohort_folder(root):
        return "cohort"
    if is_benchmark_folder(root):
        return "benchmark"
    if any((root / m).is_file() for m in RAW_MIMIC3_MARKERS) or (root / "hosp").is_dir():
        layout = detect_layout(root)
        if layout is not None:
            return layout
    raise CohortError(
        f"data root {root} holds no recognised data: expected cohort.json (a cohort), "
        f"{BENCHMARK_FILES[0]} (SafeDrug benchmark pickles) or raw MIMIC tables"
    )


def resolve_cohort(
    root: str | os.PathLike | None,
    source: Source = "auto",
    synthetic: SyntheticSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    etl: EtlOptions | None = None,
) -> Cohort:
    """Load the cohort a DataModule trains on; no ``root`` means the synthetic default.

    A raw MIMIC folder goes through the ETL (``etl`` options; default: the reference
    processing, mapping files found via $MEDREC_MAPPINGS or next to the tables) and is cached
    under ``cache_dir`` keyed by its input files and the options.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if root is None or source == "synthetic":
        if root is not None:
            raise CohortError("source='synthetic' takes no root; drop --data.init_args.root")
        return synthetic_cohort(synthetic or SyntheticSpec(), cache)
    root = Path(root).expanduser()
    kind = detect_source(root) if source == "auto" else source
    if kind == "cohort":
        return Cohort.load(root)
    if kind == "benchmark":
        return cached_cohort(cache / import_cache_name(root), lambda: read_benchmark(root))
    if kind in ("mimic3", "mimic4"):
        return prepare_cohort(root, kind, etl, cache_dir=cache)
    raise CohortError(f"unknown data source {kind!r}")

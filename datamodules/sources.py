"""Turn a user's ``root`` folder (or none) into a Cohort, detecting what the folder holds."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

from datamodules.benchmark import BENCHMARK_FILES, is_benchmark_folder, read_benchmark
from datamodules.cohort import Cohort, CohortError, is_cohort_folder
from datamodules.synthetic import SyntheticSpec, synthetic_cohort

log = logging.getLogger(__name__)

Source = Literal["auto", "cohort", "benchmark", "synthetic", "mimic3", "mimic4"]
RAW_MIMIC3_MARKERS = ("ADMISSIONS.csv", "ADMISSIONS.csv.gz", "admissions.csv", "admissions.csv.gz")


def default_cache_dir() -> Path:
    """Where generated and imported cohorts are kept: $MEDREC_CACHE or ~/.cache/medrec."""
    return Path(os.environ.get("MEDREC_CACHE") or Path.home() / ".cache" / "medrec")


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
    if any((root / m).is_file() for m in RAW_MIMIC3_MARKERS):
        return "mimic3"
    if (root / "hosp").is_dir():
        return "mimic4"
    raise CohortError(
        f"data root {root} holds no recognised data: expected cohort.json (a cohort), "
        f"{BENCHMARK_FILES[0]} (SafeDrug benchmark pickles) or raw MIMIC tables"
    )


def _import_key(root: Path) -> str:
    stamp = "|".join(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.glob("*.pkl")) if p.is_file()
    )
    digest = hashlib.sha1(f"{root.resolve()}|{stamp}".encode()).hexdigest()[:10]
    return f"benchmark-{root.name}-{digest}"


def resolve_cohort(
    root: str | os.PathLike | None,
    source: Source = "auto",
    synthetic: SyntheticSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Cohort:
    """Load the cohort a DataModule trains on; no ``root`` means the synthetic default."""
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
        folder = cache / _import_key(root)
        if is_cohort_folder(folder):
            return Cohort.load(folder)
        cohort = read_benchmark(root)
        cohort.save(folder)
        log.info("imported benchmark %s into cohort %s", root, folder)
        return cohort
    if kind in ("mimic3", "mimic4"):
        raise CohortError(
            f"{root} holds raw {kind.upper()} tables; this medrec build has no raw-MIMIC ETL yet. "
            "Convert them to a cohort folder (see README 'Cohort format') and point root at it"
        )
    raise CohortError(f"unknown data source {kind!r}")

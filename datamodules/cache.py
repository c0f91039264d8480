"""medrec's one caching scheme: derived data lives under the cache folder, named by a digest.

Every cache entry (a synthetic cohort, an imported benchmark release, an ETL cohort, a
molecule mask) is named ``<label>-<digest>`` where the digest covers everything its content
depends on: a version of the code that produces it, its options and the stamps
(path, size, mtime) of its input files. A changed input, option or version yields another
name, so an entry is never stale, only unused. Entries are written atomically
(``datamodules.atomic``), so concurrent runs can share the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from datamodules.cohort import Cohort, CohortError, is_cohort_folder

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where generated and imported cohorts are kept: $MEDREC_CACHE or ~/.cache/medrec."""
    return Path(os.environ.get("MEDREC_CACHE") or Path.home() / ".cache" / "medrec")


def digest(payload) -> str:
    """SHA-1 of ``payload`` as canonical JSON (sorted keys): equal content, equal digest."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_name(label: str, payload, length: int = 10) -> str:
    """``<label>-<first length hex digits of digest(payload)>``."""
    return f"{label}-{digest(payload)[:length]}"


def file_stamp(path: Path) -> dict:
    """What identifies an input file's content cheaply: resolved path, size, modification time."""
    if not path.is_file():
        raise CohortError(f"input file {path} does not exist")
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_cohort(folder: Path, build: Callable[[], Cohort]) -> Cohort:
    """The cohort cached in ``folder``, or ``build()``'s, saved there (atomically) for next time."""
    if is_cohort_folder(folder):
        return Cohort.load(folder)
    cohort = build()
    cohort.save(folder)
    log.info("cached cohort %s (%s)", folder, cohort.source)
    return cohort

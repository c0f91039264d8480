"""One ETL run's state: the DuckDB connection, the opened tables, and the report it fills.

The steps (``readers``, ``prescriptions``, ``assembly``) are functions of an ``EtlSession``;
they pass data to each other as DuckDB temp tables (named in each step's docstring), so no
table is ever held in Python memory.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from datamodules.atomic import scratch_folder
from datamodules.cohort import CohortError
from datamodules.mimic.options import EtlOptions
from datamodules.mimic.tables import Layout, RawTable

log = logging.getLogger(__name__)

# Casts of raw CSV text: unparseable text becomes NULL, which ``bad`` then finds and reports.
BIGINT = "TRY_CAST(trim({}) AS BIGINT)"
TIMESTAMP = "TRY_CAST(trim({}) AS TIMESTAMP)"
DOUBLE = "TRY_CAST(trim({}) AS DOUBLE)"


def bad(raw: str, parsed: str) -> str:
    """SQL: the raw text where it is non-empty but did not parse, else NULL."""
    return f"CASE WHEN {parsed} IS NULL AND nullif(trim({raw}), '') IS NOT NULL THEN {raw} END"


@contextmanager
def duckdb_connection(options: EtlOptions) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB that spills beyond ``options.memory_limit`` into a scratch folder
    (``options.temp_dir`` or a private one, removed afterwards or by the next run if killed)."""
    base = Path(tempfile.gettempdir()) / "medrec-duckdb"
    spill = Path(options.temp_dir) if options.temp_dir else scratch_folder(base)
    config = {"memory_limit": options.memory_limit, "preserve_insertion_order": False, "temp_directory": str(spill)}
    if options.threads:
        config["threads"] = options.threads
    con = duckdb.connect(config=config)
    try:
        yield con
    finally:
        con.close()
        if not options.temp_dir:
            shutil.rmtree(spill, ignore_errors=True)


class EtlSession:
    """The connection, inputs and report of one ETL run, with the checks every step shares."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        root: Path,
        layout: Layout,
        options: EtlOptions,
        tables: dict[str, RawTable],
        mapping_files: dict[str, Path | None],
    ):
        self.con, self.root, self.layout, self.options = con, root, layout, options
        self.tables, self.mapping_files = tables, mapping_files
        self.report: dict = {"layout": layout, "root": str(root), "tables": {}, "steps": [], "notes": []}
        self.reading: Path | None = None  # the file being scanned, for error messages

    def sql(self, query: str, params=None):
        return self.con.execute(query, params) if params is not None else self.con.execute(query)

    def row(self, query: str) -> tuple | None:
        """The first row of a query (None when it has none); always consumes the whole result."""
        rows = self.sql(query).fetchall()
        return rows[0] if rows else None

    def scalar(self, query: str):
        return self.row(query)[0]

    def register(self, name: str, frame) -> None:
        """Copy a pandas frame into temp table ``name``."""
        self.con.register(f"{name}_df", frame)
        self.sql(f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_df")
        self.con.unregister(f"{name}_df")

    def note(self, message: str) -> None:
        log.info(message)
        self.report["notes"].append(message)

    def step(self, name: str, table: str) -> None:
        """Record the admissions and patients left in ``table`` after filter step ``name``."""
        adm, pat = self.row(f"SELECT count(*), count(DISTINCT subject_id) FROM {table}")
        self.report["steps"].append({"step": name, "admissions": int(adm), "patients": int(pat)})
        log.info("%-22s %8d admissions %8d patients", name, adm, pat)
        if adm == 0:
            raise CohortError(
                f"{self.root}: no admission is left after step {name!r} "
                f"(counts so far: {[(s['step'], s['admissions']) for s in self.report['steps']]})"
            )

    def min_admissions(self, new: str, old: str) -> None:
        """Temp table ``new``: the rows of ``old`` whose patient has >= ``min_admissions`` rows."""
        self.sql(
            f"CREATE OR REPLACE TEMP TABLE {new} AS SELECT * FROM {old} WHERE subject_id IN "
            f"(SELECT subject_id FROM {old} GROUP BY subject_id HAVING count(*) >= {self.options.min_admissions})"
        )

    def check_parsed(self, table: RawTable, temp: str, column: str, what: str) -> None:
        """Raise naming the file and column if a non-empty value failed to parse."""
        count, example = self.row(
            f"SELECT coalesce(sum(n) FILTER (WHERE bad_{column} IS NOT NULL), 0), any_value(bad_{column}) FROM {temp}"
        )
        if count:
            raise CohortError(
                f"{table.path}: column {table.columns[column]!r} has {count} unparseable {what} value(s), "
                f"e.g. {example!r}"
            )

    def require_rows(self, table: RawTable, temp: str) -> int:
        rows = int(self.scalar(f"SELECT coalesce(sum(n), 0) FROM {temp}") or 0)
        if rows == 0:
            raise CohortError(f"{table.path}: table is empty (header only)")
        return rows

    def table_stats(self, name: str, table: RawTable, temp: str, **extra) -> dict:
        """Report a raw table's rows and duplicates (``temp`` holds its distinct rows with count ``n``)."""
        rows, distinct = self.row(f"SELECT coalesce(sum(n), 0), count(*) FROM {temp}")
        stats = {"file": str(table.path), "rows": int(rows), "duplicate_rows": int(rows - distinct), **extra}
        self.report["tables"][name] = stats
        if stats["duplicate_rows"]:
            self.note(f"{table.path.name}: {stats['duplicate_rows']} duplicated row(s) removed")
        return stats

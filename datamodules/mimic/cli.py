"""``medrec-prepare``: raw MIMIC folder -> cohort folder (also ``python -m datamodules.mimic``).

    medrec-prepare /data/mimiciii/1.4 --out cohorts/mimic3 --mappings /data/drug-maps
    medrec-prepare /data/mimiciv/3.1 --out cohorts/mimic4 --min_admissions 1 --drug_window_hours 24

Every ETL option is a flag (``medrec-prepare --help``); ``--config etl.yaml`` reads them from a
file. A second run with unchanged inputs and options reuses the folder (``--force`` rebuilds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.cohort import CohortError
from datamodules.errors import MedRecError, OptionError, run_reporting_errors
from datamodules.mimic.etl import EtlOptions, prepare, read_etl_report


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="medrec-prepare",
        description="Build a medrec cohort folder from raw MIMIC-III / MIMIC-IV tables.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file with any of the options below")
    parser.add_argument("root", type=str, help="the MIMIC folder (MIMIC-III tables, or MIMIC-IV hosp/ and icu/)")
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="cohort folder to write (default: the medrec cache, $MEDREC_CACHE or ~/.cache/medrec)",
    )
    parser.add_argument("--source", type=Literal["auto", "mimic3", "mimic4"], default="auto", help="table layout")
    parser.add_argument("--cache_dir", type=str | None, default=None, help="cache folder when --out is not given")
    parser.add_argument("--force", type=bool, default=False, help="rebuild even if the output is up to date")
    parser.add_argument("--quiet", type=bool, default=False, help="print only the output folder")
    parser.add_class_arguments(EtlOptions, None, skip={"options_from"})  # train.py's messages only
    return parser


def main(argv: list[str] | None = None) -> None:
    """A bad option, table or output folder is one ``medrec-prepare: error: ...`` line, exit code 2
    (``MEDREC_DEBUG=1``: the traceback instead)."""
    run_reporting_errors("medrec-prepare", lambda: _prepare(argv))


def _prepare(argv: list[str] | None) -> None:
    parser = make_parser()
    parser.exit_on_error = False  # main() prints a bad option as one line
    args = parser.parse_args(argv)
    try:
        options = EtlOptions(**{f.name: args[f.name] for f in fields(EtlOptions) if f.name in args})
    except ValueError as err:  # EtlOptions' own range checks
        raise OptionError(str(err)) from None
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        cohort, folder = prepare(
            args.root, args.source, options, out=args.out, cache_dir=args.cache_dir, force=args.force
        )
    except ValueError as err:  # the ETL's checks of its inputs (CohortError is one)
        raise err if isinstance(err, MedRecError) else CohortError(str(err)) from None
    if not args.quiet:
        report = read_etl_report(folder)
        print(format_report(report))
        print(f"cohort: {cohort.summary()}")
        print(f"done in {time.perf_counter() - started:.1f} s; train with --data.init_args.root={folder}")
    else:
        print(folder)


def format_report(report: dict) -> str:
    lines = [f"{'step':<24}{'admissions':>12}{'patients':>10}"]
    lines += [f"{s['step']:<24}{s['admissions']:>12}{s['patients']:>10}" for s in report["steps"]]
    mapping = report.get("drug_mapping", {})
    if mapping:
        lines.append(
            f"drug mapping: {mapping['unmapped_rows']} of {mapping['rows']} prescription rows unmapped "
            f"({100 * mapping['unmapped_fraction']:.1f} %), {mapping['unmapped_ndcs']} of "
            f"{mapping['distinct_ndcs']} NDCs"
        )
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

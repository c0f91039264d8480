"""The header every benchmark report starts with: the command that regenerates it, the commit it
ran at (and whether the working tree had uncommitted changes) and a hash of its configuration.

    prov = Provenance.capture("benchmarks/leaderboard.py", argv, config={...})
    write_markdown(out / "report.md", body, prov)   # header lines, a blank line, body
    write_json(out / "report.json", payload, prov)  # payload with a "provenance" field

The config hash identifies what was measured, not where it was written: callers hash the
options that decide the figures (config file *contents*, data, seeds, epochs, overrides) and
leave out output folders, so two reports with the same hash measured the same thing.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN_FIELDS = ("Command", "Commit", "Config hash")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes ("missing" when there is no such file)."""
    path = Path(path)
    if not path.is_absolute() and not path.is_file():
        path = ROOT / path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def config_hash(config: object) -> str:
    """12 hex digits of the sha256 of ``config`` as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_config_hash(
    config: str, data: str | None, epochs: int | None, seed: int | None, overrides: list[str] | tuple[str, ...]
) -> str:
    """The hash of one ``benchmarks/run.py`` run: what it trains and tests, not where it writes.

    The config file enters by content (an edited config is another run); the data folder by its
    path as given (a cohort is an input named on the command line, not hashed byte by byte).
    """
    return config_hash(
        {
            "config": file_digest(config),
            "data": data,
            "epochs": epochs,
            "seed": seed,
            "overrides": list(overrides),
        }
    )


def options_config(options: object, leave_out: tuple[str, ...] = ("out",)) -> dict:
    """A script's parsed options (an ``argparse.Namespace``) as a config to hash, without its output folder."""
    return {k: v for k, v in sorted(vars(options).items()) if k not in leave_out}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


@dataclass(frozen=True)
class Provenance:
    """Where a report came from: ``command`` regenerates it from the repository root."""

    command: str
    commit: str
    dirty: bool | None
    config_hash: str

    @classmethod
    def capture(cls, script: str, argv: list[str], config: object = None, digest: str | None = None) -> Provenance:
        """``script`` as typed from the repository root (``benchmarks/x.py``), its arguments, and the
        options that decide the figures (default: the arguments themselves), or their ready ``digest``."""
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
        return cls(
            command=shlex.join(["python", script, *map(str, argv)]),
            commit=commit or "unknown (no git checkout)",
            dirty=None if status is None else bool(status),
            config_hash=digest or config_hash(list(map(str, argv)) if config is None else config),
        )

    def fields(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        """Three lines (markdown line breaks) and a blank line."""
        state = {True: " (with uncommitted changes)", False: "", None: ""}[self.dirty]
        return f"Command: `{self.command}`  \nCommit: `{self.commit}`{state}  \nConfig hash: `{self.config_hash}`\n\n"


def write_markdown(path: str | Path, body: str, provenance: Provenance) -> str:
    """Writes ``provenance``'s header then ``body`` to ``path``; returns the text."""
    text = provenance.markdown() + body
    Path(path).write_text(text)
    return text


def with_provenance(payload: dict | list, provenance: Provenance) -> dict:
    """``payload`` with a ``provenance`` field (a list payload goes under ``rows``)."""
    payload = {"rows": payload} if isinstance(payload, list) else dict(payload)
    return {"provenance": provenance.fields(), **payload}


def write_json(path: str | Path, payload: dict | list, provenance: Provenance) -> dict:
    """Writes ``payload`` with its ``provenance`` field to ``path``; returns what was written."""
    payload = with_provenance(payload, provenance)
    Path(path).write_text(json.dumps(payload, indent=1, default=str))
    return payload


def read_markdown_header(text: str) -> dict:
    """The header fields of a report's text (for tests and tools): {"Command": ..., "Commit": ..., ...}."""
    fields = {}
    for line, name in zip(text.splitlines(), MARKDOWN_FIELDS):
        if not line.startswith(f"{name}: `"):
            break
        fields[name] = line.split("`")[1]
    return fields

"""The grid runner: one ``benchmarks/run.py`` run per cell (config × data × seed × overrides), each
in its own folder and process, resumable, and the mean ± std over seeds of what they measured.

    cells = grid_cells(["configs/lr.yaml", "configs/retain.yaml"], seeds=[0, 1, 2], data=folder)
    outcomes = run_grid(cells, out, jobs=2)           # {cell: results dict or CellFailed}
    summary = aggregate(results_frame(outcomes), ["jaccard", "ddi_rate"])

A cell's folder is ``<out>/<cell.name>`` (``<method>/seed<s>`` by default): ``results.json`` and
``results.md`` from run.py, ``log.txt`` (its output). A cell whose ``results.json`` carries the
cell's config hash (``provenance.run_config_hash``: config file contents, data, epochs, seed,
overrides) is not run again, so an interrupted grid resumes and a changed config or override
reruns only the cells it changes. Used by leaderboard.py, dpr_table.py and miranda_seeds.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.provenance import run_config_hash

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
QUIET = ("--trainer.enable_progress_bar=false",)
"""The overrides leaderboard.py and ablation.py give every cell (part of its hash: the two share cells)."""


@dataclass(frozen=True)
class Cell:
    """One run of ``benchmarks/run.py``: ``method`` groups cells for aggregation (seeds vary within it)."""

    method: str
    config: str
    seed: int | None = None
    data: str | None = None
    epochs: int | None = None
    overrides: tuple[str, ...] = ()
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            name = self.method if self.seed is None else f"{self.method}/seed{self.seed}"
            object.__setattr__(self, "name", name)
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @property
    def hash(self) -> str:
        return run_config_hash(self.config, self.data, self.epochs, self.seed, self.overrides)

    def command(self, folder: Path) -> list[str]:
        """The run.py command line of this cell, writing into ``folder``."""
        command = [sys.executable, str(RUN), "--config", self.config, "--out", str(folder)]
        if self.data is not None:
            command += ["--data", self.data]
        if self.epochs is not None:
            command += ["--epochs", str(self.epochs)]
        if self.seed is not None:
            command += ["--seed", str(self.seed)]
        return command + list(self.overrides)


class CellFailed(RuntimeError):
    """run.py exited non-zero for this cell; ``log`` holds its output."""

    def __init__(self, cell: Cell, log: Path, returncode: int):
        super().__init__(f"{cell.name} failed (exit {returncode}); see {log}")
        self.cell, self.log, self.returncode = cell, log, returncode


def grid_cells(
    configs: Iterable[str],
    seeds: Iterable[int | None] = (None,),
    data: str | None = None,
    epochs: int | None = None,
    overrides: Iterable[str] = (),
    per_seed: Callable[[int | None], list[str]] | None = None,
) -> list[Cell]:
    """Every config × seed, method named after the config file; ``per_seed(seed)`` adds overrides
    that depend on the seed (e.g. the data split seed)."""
    seeds = list(seeds)
    return [
        Cell(
            method=Path(config).stem,
            config=str(config),
            seed=seed,
            data=data,
            epochs=epochs,
            overrides=(*overrides, *(per_seed(seed) if per_seed else [])),
        )
        for config in configs
        for seed in seeds
    ]


def finished(cell: Cell, out: Path) -> dict | None:
    """The cell's results if its folder holds a run of exactly this cell, else None."""
    path = Path(out) / cell.name / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("provenance", {}).get("config_hash") == cell.hash else None


def run_cell(cell: Cell, out: Path) -> dict:
    """The cell's results: reused when finished, else from a fresh run.py process."""
    results = finished(cell, out)
    if results is not None:
        return results
    folder = Path(out) / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").unlink(missing_ok=True)  # a stale run must not pass for this one
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # nor its checkpoints (best-*.ckpt beside -v1)
    log = folder / "log.txt"
    with log.open("w") as handle:
        done = subprocess.run(cell.command(folder), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise CellFailed(cell, log, done.returncode)
    return json.loads((folder / "results.json").read_text())


def run_grid(cells: list[Cell], out: str | Path, jobs: int = 1, progress: bool = True) -> dict[Cell, dict | Exception]:
    """Runs every cell (``jobs`` at a time, each its own process); a failed cell's entry is its exception."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"grid cells must have distinct names, got {names}")
    outcomes: dict[Cell, dict | Exception] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_cell, cell, out): cell for cell in cells}
        done = as_completed(futures)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(futures), desc="grid cells", unit="run")
        for future in done:
            cell = futures[future]
            try:
                outcomes[cell] = future.result()
            except Exception as error:  # the caller decides what a failed cell means
                outcomes[cell] = error
    return {cell: outcomes[cell] for cell in cells}  # in the cells' order


def results_frame(outcomes: dict[Cell, dict | Exception]) -> pd.DataFrame:
    """One row per finished cell: its results plus ``method``, ``seed`` and ``cell``."""
    rows = [
        {**result, "method": cell.method, "seed": cell.seed, "cell": cell.name}
        for cell, result in outcomes.items()
        if isinstance(result, dict)
    ]
    return pd.DataFrame(rows)


def aggregate(results: pd.DataFrame, keys: Iterable[str], by: str = "method") -> pd.DataFrame:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of ``keys`` per ``by`` group:
    columns ``<key>``, ``<key>_std`` and ``seeds`` (the number of rows averaged), groups in order."""
    rows = []
    for group, frame in results.groupby(by, sort=False):
        row = {by: group, "seeds": len(frame)}
        for key in keys:
            values = frame[key].dropna().astype(float) if key in frame else pd.Series(dtype=float)
            row[key] = values.mean() if len(values) else float("nan")
            row[f"{key}_std"] = values.std(ddof=1) if len(values) > 1 else (0.0 if len(values) else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def paired_t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of the paired t-test of ``a`` vs ``b`` (NaN with fewer than 2 pairs or no variance)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.allclose(a - b, 0):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def paired_by_seed(results: pd.DataFrame, key: str, method: str, reference: str) -> dict:
    """``method`` − ``reference`` on ``key`` over the seeds both ran: seeds, mean difference, t, p."""
    from scipy import stats

    table = results.pivot_table(index="seed", columns="method", values=key, aggfunc="first")
    if method not in table or reference not in table:
        return {"seeds": [], "mean_difference": float("nan"), "t": None, "p_value": None}
    both = table[[method, reference]].dropna()
    a, b = both[method].to_numpy(float), both[reference].to_numpy(float)
    test = stats.ttest_rel(a, b) if len(both) > 1 and not np.allclose(a - b, 0) else None
    return {
        "seeds": [int(s) for s in both.index],
        "mean_difference": float((a - b).mean()) if len(both) else float("nan"),
        "t": None if test is None else float(test.statistic),
        "p_value": None if test is None else float(test.pvalue),
    }

"""Full 2-process DDP fits (CPU, gloo) of every method through train.py, checked against 1 process.

    OMP_NUM_THREADS=1 MEDREC_CACHE=/tmp/mc_ddp python benchmarks/ddp_fit_check.py --out <dir> \
        [--methods lr safedrug ...] [--patients 305] [--epochs 2] [--train-batches 3]

For each main method config (``configs/<method>.yaml`` without a variant header, see
:mod:`lightning_modules.registry`) on a small synthetic cohort (305 patients:
51 validation and 51 test patients, odd, so a sampler that pads the ranks to equal length
would count a patient twice):

1. ``train.py fit`` with ``--trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp``
   (Lightning re-launches train.py for rank 1), ``--epochs`` epochs of ``--train-batches``
   batches, full validation; the fit must finish and write ``last.ckpt``. SafeDrug and GAMENet
   run with target DDI rate 0 so their controllers act every step (see ``EXTRA``).
2. :class:`RankStateRecorder`, appended to ``trainer.callbacks``, writes each rank's view:
   after every training batch the controller state (SafeDrug's :class:`PIDDDIController` β,
   rate, error, integral, step count; GAMENet's :class:`DDIAnnealing` temperature, decay and
   step counts and its generator state; MiranDa's phase buffers), and at fit end the
   module's full ``state_dict`` (parameters and buffers) and validation figures. The ranks
   must agree exactly (the DDP wrapper re-broadcasts buffers from rank 0 at every training
   forward, so per-step records taken after the step, not the final buffers, are what shows
   a divergence).
3. ``train.py test --ckpt_path last.ckpt`` on 1 process and on 2 processes (``ddp``); every
   ``test_*`` figure must agree within 1e-6 (and both ranks of the 2-process run must report
   the same figures).

Writes ``<out>/ddp_fit_check.md`` (and ``.json``; both with the provenance header) with one row per
method and prints the table; exits 1 if any check fails. Run logs are in ``<out>/<method>/*.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not an installed copy

from benchmarks.provenance import Provenance, file_digest, options_config, write_json, write_markdown  # noqa: E402
from lightning_modules.registry import method_configs  # noqa: E402

METHODS = tuple(method_configs())  # every main method config; variants share their parent's code paths
# Per-method overrides. Target DDI rate 0 keeps the controllers busy on the synthetic cohort,
# whose predicted DDI rate (~0.015) lies under the configs' targets: SafeDrug's β moves every
# step, GAMENet draws the DDI loss often. DPR pre-trains NCF for 1 epoch instead of 40.
EXTRA = {
    "safedrug": ["--ddi_controller.init_args.target_ddi", "0.0"],
    "gamenet": ["--ddi_controller.init_args.target_ddi", "0.0"],
    "dpr_wg": ["--model.init_args.pretrain_epochs", "1"],
    "dpr_ag": ["--model.init_args.pretrain_epochs", "1"],
}
TOLERANCE = 1e-6


class RankStateRecorder(L.Callback):
    """Writes this rank's controller trace, final weights and figures under ``out`` (one file per rank).

    Files: ``fit_rank<r>.json`` (``trace``: controller state after every training batch;
    ``metrics``: the callback metrics at fit end), ``fit_rank<r>.pt`` (the module's state_dict)
    and ``test_rank<r>.json`` (the callback metrics at test end).
    """

    def __init__(self, out: str):
        self.out = Path(out)
        self.trace: list[dict] = []

    @staticmethod
    def controller_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        from callbacks import DDIAnnealing, PIDDDIController

        state = {}
        for callback in trainer.callbacks:
            if isinstance(callback, PIDDDIController):
                state["pid"] = callback.state_dict()
            elif isinstance(callback, DDIAnnealing):
                annealing = dict(callback.state_dict())
                annealing["generator"] = hashlib.sha1(annealing["generator"].numpy().tobytes()).hexdigest()
                state["annealing"] = annealing
        for name, buffer in pl_module.named_buffers():
            if name.startswith(("phase", "therapeutic_")):  # MiranDa's phase state
                state[name] = buffer.item()
        return state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trace.append(self.controller_state(trainer, pl_module))

    def _write(self, name: str, payload: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / name).write_text(json.dumps(payload, indent=1))

    @staticmethod
    def _metrics(trainer: L.Trainer) -> dict:
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.out / f"fit_rank{rank}.pt")
        self._write(f"fit_rank{rank}.json", {"trace": self.trace, "metrics": self._metrics(trainer)})
        trainer.strategy.barrier()  # both files exist before rank 0 returns

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(f"test_rank{trainer.global_rank}.json", {"metrics": self._metrics(trainer)})
        trainer.strategy.barrier()


# --- driver -------------------------------------------------------------------------------
def run_cli(args: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Runs ``train.py`` with ``args`` (its own process group, killed on timeout); (rc, seconds)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group holds rank 1, launched by rank 0
            process.wait()
            rc = -9
    return rc, time.perf_counter() - start


def common_args(method: str, opts: argparse.Namespace, work: Path, devices: int, record: Path) -> list[str]:
    recorder = {"class_path": "benchmarks.ddp_fit_check.RankStateRecorder", "init_args": {"out": str(record)}}
    args = [
        "--config",
        str(ROOT / "configs" / f"{method}.yaml"),
        "--data.init_args.synthetic_patients",
        str(opts.patients),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(work / "logs"),
        *EXTRA.get(method, []),
        f"--trainer.callbacks+={json.dumps(recorder)}",
    ]
    return args + (["--trainer.strategy", "ddp"] if devices > 1 else [])


def nan_equal(a, b) -> bool:
    """Exact equality of JSON-like values, NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(nan_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def max_state_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state_dicts (inf if their keys or shapes differ)."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape:
            return math.inf
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        both_nan = torch.isnan(x) & torch.isnan(y)
        diff = torch.where(both_nan, torch.zeros_like(x), (x - y).abs())
        worst = max(worst, float(diff.nan_to_num(nan=math.inf).max()))
    return worst


def max_metric_diff(a: dict, b: dict) -> float:
    keys = {k for k in a if k.startswith("test_")}
    if not keys or keys != {k for k in b if k.startswith("test_")}:
        return math.inf
    diffs = [0.0 if math.isnan(a[k]) and math.isnan(b[k]) else abs(a[k] - b[k]) for k in keys]
    return max(math.inf if math.isnan(d) else d for d in diffs)


def check_method(method: str, opts: argparse.Namespace, out: Path) -> dict:
    work = out / method
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("**/*rank*.*"):
        old.unlink()
    ckpt_dir = work / "checkpoints"
    for old in ckpt_dir.glob("*.ckpt"):
        old.unlink()
    row = {"method": method, "fit_ok": False, "seconds": None, "controller": None, "steps": 0}
    row.update({"params_equal": None, "val_equal": None, "test_diff": None, "test_ranks_equal": None, "notes": []})

    fit_args = common_args(method, opts, work, 2, work / "fit")
    fit_args += [
        "--trainer.max_epochs",
        str(opts.epochs),
        "--trainer.limit_train_batches",
        str(opts.train_batches),
        "--checkpoint.dirpath",
        str(ckpt_dir),
    ]
    rc, seconds = run_cli(["fit", *fit_args], work / "fit.log", opts.timeout)
    row["seconds"] = round(seconds, 1)
    last = ckpt_dir / "last.ckpt"
    ranks = [work / "fit" / f"fit_rank{r}.json" for r in (0, 1)]
    row["fit_ok"] = rc == 0 and last.is_file() and all(p.is_file() for p in ranks)
    if not row["fit_ok"]:
        row["notes"].append(f"fit rc {rc}, last.ckpt {'found' if last.is_file() else 'missing'}; see {work}/fit.log")
        return row

    r0, r1 = (json.loads(p.read_text()) for p in ranks)
    row["steps"] = len(r0["trace"])
    row["controller"] = nan_equal(r0["trace"], r1["trace"]) and len(r0["trace"]) > 0
    if row["controller"] and not any(r0["trace"]):
        row["controller"] = "n/a"  # no controller in this method
    s0, s1 = (torch.load(work / "fit" / f"fit_rank{r}.pt", weights_only=True) for r in (0, 1))
    row["params_equal"] = max_state_diff(s0, s1) == 0.0
    val = lambda m: {k: v for k, v in m.items() if k.startswith("val_")}  # noqa: E731
    row["val_equal"] = nan_equal(val(r0["metrics"]), val(r1["metrics"])) and bool(val(r0["metrics"]))

    tests = {}
    for devices in (1, 2):
        record = work / f"test{devices}"
        args = ["test", *common_args(method, opts, work, devices, record), "--ckpt_path", str(last)]
        rc, _ = run_cli(args, work / f"test{devices}.log", opts.timeout)
        files = [record / f"test_rank{r}.json" for r in range(devices)]
        if rc != 0 or not all(p.is_file() for p in files):
            row["notes"].append(f"test on {devices} process(es) failed (rc {rc}); see {work}/test{devices}.log")
            return row
        tests[devices] = [json.loads(p.read_text())["metrics"] for p in files]
    row["test_diff"] = max_metric_diff(tests[1][0], tests[2][0])
    row["test_ranks_equal"] = max_metric_diff(tests[2][0], tests[2][1]) == 0.0
    row["test_patients"] = (tests[1][0].get("test_patients"), tests[2][0].get("test_patients"))
    return row


def passed(row: dict) -> bool:
    return bool(
        row["fit_ok"]
        and row["controller"] in (True, "n/a")
        and row["params_equal"]
        and row["val_equal"]
        and row["test_diff"] is not None
        and row["test_diff"] <= TOLERANCE
        and row["test_ranks_equal"]
    )


def table(rows: list[dict], opts: argparse.Namespace) -> str:
    def yes(value) -> str:
        return {True: "yes", False: "**no**", None: "–"}.get(value, str(value))

    lines = [
        f"2-process DDP fit (CPU, gloo, `strategy=ddp` through train.py) vs 1 process; synthetic cohort of "
        f"{opts.patients} patients, {opts.epochs} epochs x {opts.train_batches} training batches, full validation; "
        f"SafeDrug/GAMENet with target DDI 0 (controllers active), DPR with 1 NCF pre-training epoch; "
        f"test = `train.py test --ckpt_path last.ckpt`.",
        "",
        "| method | fit ok | fit s | train steps | controller state equal | weights equal | val equal "
        "| test patients 1/2 proc | test 1-proc vs 2-proc max abs diff | 2-proc ranks equal | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "–" if r["test_diff"] is None else f"{r['test_diff']:.1e}"
        patients = "/".join(f"{p:.0f}" for p in r.get("test_patients", ())) or "–"
        lines.append(
            f"| {r['method']} | {yes(r['fit_ok'])} | {r['seconds']} | {r['steps']} | {yes(r['controller'])} "
            f"| {yes(r['params_equal'])} | {yes(r['val_equal'])} | {patients} | {diff} "
            f"| {yes(r['test_ranks_equal'])} | {yes(passed(r))} |"
        )
    notes = [f"- {r['method']}: {n}" for r in rows for n in r["notes"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--patients", type=int, default=305, help="synthetic cohort size; 305 gives 51 test and 51 validation patients"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per train.py run")
    opts = parser.parse_args(argv)
    missing = [m for m in opts.methods if not (ROOT / "configs" / f"{m}.yaml").is_file()]
    if missing:
        parser.error(f"no config for {missing}")
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in opts.methods:
        row = check_method(method, opts, out)
        rows.append(row)
        print(f"{method}: {'pass' if passed(row) else 'FAIL'} ({row['seconds']} s fit)", flush=True)
    configs = {m: file_digest(ROOT / "configs" / f"{m}.yaml") for m in opts.methods}
    provenance = Provenance.capture("benchmarks/ddp_fit_check.py", argv, config={**options_config(opts), **configs})
    write_json(out / "ddp_fit_check.json", rows, provenance)
    print(write_markdown(out / "ddp_fit_check.md", table(rows, opts), provenance))
    return 0 if all(passed(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

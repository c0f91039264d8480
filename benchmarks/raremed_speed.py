"""RAREMed training speed: medrec's batched fine-tuning step against one visit per optimiser step.

    python benchmarks/raremed_speed.py [--data <folder>] --out <report.md>
        [--batches 60] [--visits 200] [--reference-visits 40] [--threads 1]

The authors' code (github.com/zzhUSTC2016/RAREMed) takes one AdamW step per visit. Its training
loop cannot run here as it is (its own preprocessing of the full MIMIC tables), so the per-visit
way of training is timed on medrec's module: the same encoder, loss and data, one visit per step,
AdamW as the reference. Rows, all fine-tuning steps (forward, loss, backward, optimiser step):

* ``medrec``: ``configs/raremed.yaml`` as it is (its batch size, Adam), over ``--batches``
  training batches; seconds per epoch = mean step × batches per epoch.
* ``one visit per step, config size``: the same model, one visit per step over ``--visits``
  training visits; seconds per epoch = mean step × training visits. The ratio of the two is what
  batching alone buys.
* ``one visit per step, reference size``: 512-d, 3 layers, feed-forward 2048 (the authors'
  defaults), over ``--reference-visits`` visits: the reference's way of training at its size.

One warm-up step is left out of every mean. The rows run back to back in one process, so they
share the machine's load; the report gives the load average before and after.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import Provenance, options_config, write_markdown  # noqa: E402
from datamodules.errors import run_reporting_errors  # noqa: E402
from datamodules.visit_sequence import VisitSequenceDataModule  # noqa: E402
from lightning_modules.raremed import RAREMed  # noqa: E402

REFERENCE_SIZE = {"embedding_dim": 512, "layers": 3, "feedforward_dim": 2048, "heads": 4}


def config_parts() -> tuple[dict, dict]:
    config = yaml.safe_load((ROOT / "configs" / "raremed.yaml").read_text())
    return dict(config["model"]["init_args"]), dict(config["data"]["init_args"])


def single_visits(batches: list[dict], count: int) -> list[dict]:
    """One-visit batches (B = T = 1) cut from collated patient batches, in order."""
    visits = []
    for batch in batches:
        for b in range(batch["visit_mask"].shape[0]):
            for t in range(int(batch["lengths"][b])):
                visit = {k: v[b : b + 1, t : t + 1] if v.dim() > 1 else v[b : b + 1] for k, v in batch.items()
                         if torch.is_tensor(v)}  # fmt: skip
                visit["lengths"] = torch.ones(1, dtype=torch.long)
                visits.append(visit)
                if len(visits) == count:
                    return visits
    return visits


def step_seconds(model: RAREMed, optimizer: torch.optim.Optimizer, batches: list[dict]) -> float:
    """Mean seconds of one fine-tuning step over ``batches[1:]`` (``batches[0]`` warms up)."""
    model.train()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model.compute_loss(model(batch), batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i > 0:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def measure(data_root: str | None, batches: int, visits: int, reference_visits: int) -> tuple[list[dict], dict]:
    model_args, data_args = config_parts()
    data = VisitSequenceDataModule(**{**data_args, "root": data_root})
    data.setup("fit")
    loader = data.train_dataloader()
    torch.manual_seed(0)
    taken = list(itertools.islice(loader, batches + 1))
    train_visits = sum(len(s["visit_ids"]) for s in data.dataset("train").samples)
    counts = {"batches_per_epoch": len(loader), "training_visits": train_visits}
    if len(taken) < batches + 1:
        raise SystemExit(f"the training split has {len(taken)} batches, fewer than --batches + 1")
    one_visit = single_visits(taken, max(visits, reference_visits) + 1)
    if len(one_visit) < max(visits, reference_visits) + 1:
        needed = max(visits, reference_visits) + 1
        raise SystemExit(
            f"the batches timed hold {len(one_visit)} visits, fewer than --visits / --reference-visits + 1 ({needed})"
        )
    rows = []
    for label, overrides, steps, per_epoch, optimizer in (
        ("medrec (config, batched)", {}, taken, len(loader), "adam"),
        ("one visit per step, config size", {}, one_visit[: visits + 1], train_visits, "adamw"),
        (
            "one visit per step, reference size",
            REFERENCE_SIZE,
            one_visit[: reference_visits + 1],
            train_visits,
            "adamw",
        ),
    ):
        torch.manual_seed(0)
        model = RAREMed(knowledge=data.knowledge, **{**model_args, **overrides})
        params = model.parameters()
        opt = (torch.optim.Adam(params, lr=model_args["lr"]) if optimizer == "adam"
               else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1))  # fmt: skip
        seconds = step_seconds(model, opt, steps)
        rows.append({"row": label, "steps": len(steps) - 1, "ms_per_step": 1000 * seconds,
                     "steps_per_epoch": per_epoch, "s_per_epoch": seconds * per_epoch})  # fmt: skip
    return rows, counts


def report(rows: list[dict], counts: dict, loads: tuple[float, float], threads: int) -> str:
    lines = [
        f"RAREMed fine-tuning step, {threads} torch thread(s); load average {loads[0]:.2f} before, "
        f"{loads[1]:.2f} after. Training split: {counts['training_visits']:,} visits, "
        f"{counts['batches_per_epoch']} batches of the config's size.",
        "",
        "| row | steps timed | ms / step | steps / epoch | s / epoch | medrec faster by |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["s_per_epoch"]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['steps']} | {r['ms_per_step']:.1f} | {r['steps_per_epoch']:,} | "
            f"{r['s_per_epoch']:.1f} | {r['s_per_epoch'] / base:.1f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data folder (pickles, cohort or raw MIMIC); default synthetic")
    parser.add_argument("--out", required=True, help="markdown report to write")
    parser.add_argument("--batches", type=int, default=60, help="batched steps timed")
    parser.add_argument("--visits", type=int, default=200, help="one-visit steps timed at the config size")
    parser.add_argument("--reference-visits", type=int, default=40, help="one-visit steps timed at 512-d")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("batches", "visits", "reference_visits"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    rows, counts = measure(args.data, args.batches, args.visits, args.reference_visits)
    body = report(rows, counts, (before, os.getloadavg()[0]), args.threads)
    print(body)
    write_markdown(args.out, body, Provenance.capture("benchmarks/raremed_speed.py", argv, config=options_config(args)))
    return body


if __name__ == "__main__":  # a bad option or data folder: one error line, exit 2
    run_reporting_errors("benchmarks/raremed_speed.py", main)

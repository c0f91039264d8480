"""Paired comparison of methods over the same test patients, from their trained checkpoints.

    python benchmarks/paired_patients.py --data <folder> --out <report.md> \
        --method updater <ckpt> [<ckpt> ...] --method safedrug <ckpt> ... [--reference updater]

Each checkpoint (one per training seed) predicts the test split of ``--data`` without a
DataModule of its own (``MedRecModule.from_checkpoint``); a patient's Jaccard is the mean over
their visits (the reference protocol), averaged over the method's seeds. Every other method is
compared with ``--reference`` over the patients both predicted: the mean difference, its 95 %
interval (patients resampled 10,000 times), the paired t-test and the share of patients each
side wins. The report starts with its command and commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy

from benchmarks.grid import paired_t_test  # noqa: E402
from benchmarks.provenance import Provenance, write_markdown  # noqa: E402
from datamodules.errors import run_reporting_errors  # noqa: E402
from datamodules.visit_sequence import VisitSequenceDataModule  # noqa: E402
from lightning_modules.base import MedRecModule  # noqa: E402
from lightning_modules.metrics import patient_means, visit_scores  # noqa: E402
from lightning_modules.recommend import load_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="report file (markdown)")
    parser.add_argument("--method", nargs="+", action="append", required=True, metavar=("NAME", "CKPT"))
    parser.add_argument("--reference", default=None, help="method the others are compared with (default: first)")
    parser.add_argument("--split", default="safedrug")
    opts = parser.parse_args(argv)
    for entry in opts.method:
        if len(entry) < 2:
            parser.error(f"--method {entry[0]}: give at least one checkpoint after the name")
    names = [entry[0] for entry in opts.method]
    if opts.reference is not None and opts.reference not in names:
        parser.error(f"--reference {opts.reference} is not one of the methods {names}")
    return opts


@torch.no_grad()
def patient_jaccard(model: MedRecModule, data: VisitSequenceDataModule) -> dict[str, float]:
    """{patient id: mean Jaccard over their test visits} of one model."""
    model.eval()
    out = {}
    for batch in data.test_dataloader():
        probs = model.predict_probabilities(batch).float()
        scores = visit_scores(probs, batch["medications"], batch["visit_mask"], model.threshold)
        means, valid = patient_means(scores["jaccard"], batch["visit_mask"])
        for patient, value, ok in zip(batch["patient_ids"], means.tolist(), valid.tolist(), strict=True):
            if ok:
                out[str(patient)] = value
    return out


def interval(differences: np.ndarray, rounds: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(rounds, len(differences)))
    means = differences[draws].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def run(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    data = VisitSequenceDataModule(root=opts.data, split=opts.split)
    data.setup("test")
    per_method: dict[str, dict[str, float]] = {}
    for name, *checkpoints in opts.method:
        seeds = [patient_jaccard(load_model(path), data) for path in checkpoints]
        patients = set.intersection(*(set(s) for s in seeds))
        per_method[name] = {p: float(np.mean([s[p] for s in seeds])) for p in patients}
    names = [entry[0] for entry in opts.method]
    reference = opts.reference or names[0]
    lines = [
        f"# Paired comparison over the test patients of {Path(opts.data).name}",
        "",
        f"Per patient: mean Jaccard over their visits, averaged over each method's checkpoints. "
        f"Differences are {reference} − method.",
        "",
        "| method | checkpoints | patients | mean Jaccard | "
        f"{reference} − method | 95 % interval | paired t p | {reference} wins | method wins |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {entry[0]: len(entry) - 1 for entry in opts.method}
    for name in names:
        common = sorted(set(per_method[name]) & set(per_method[reference]))
        mine = np.array([per_method[name][p] for p in common])
        theirs = np.array([per_method[reference][p] for p in common])
        row = f"| {name} | {counts[name]} | {len(common)} | {mine.mean():.4f} | "
        if name == reference:
            lines.append(row + "– | – | – | – | – |")
            continue
        diff = theirs - mine
        low, high = interval(diff)
        row += f"{diff.mean():+.4f} | [{low:+.4f}, {high:+.4f}] | {paired_t_test(theirs, mine):.2g} | "
        row += f"{(diff > 0).mean():.1%} | {(diff < 0).mean():.1%} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    write_markdown(Path(opts.out), text, Provenance.capture("benchmarks/paired_patients.py", argv))
    print(text)
    return text


if __name__ == "__main__":  # a bad option, data folder or checkpoint: one error line, exit 2
    run_reporting_errors("benchmarks/paired_patients.py", run)

"""Check that every DDP rank takes the same DDIAnnealing decisions (2 CPU ranks, gloo backend).

    python benchmarks/ddi_switch_ddp_check.py [--out /tmp/ddi-ddp]

Fits GAMENet for two epochs on a handmade cohort with ``strategy="ddp"`` on two CPU processes.
Each rank sees different patients, hence different local pair counts; the callback sums them
over the ranks and draws from a generator seeded identically everywhere, so the decision lists
must be equal. Threshold 0 (every drug recommended) and T = 0.3 make both outcomes frequent.
Prints one line and exits 1 if the ranks disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import lightning as L  # noqa: E402
from conftest import write_cohort  # noqa: E402

from callbacks import DDIAnnealing  # noqa: E402
from datamodules.visit_sequence import VisitSequenceDataModule  # noqa: E402
from lightning_modules import GAMENet  # noqa: E402


class RecordingAnnealing(DDIAnnealing):
    """DDIAnnealing that writes (local ddi pairs, local pairs, decision) per step to a file per rank."""

    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out, self.records = out, []

    def choose(self, ddi_pairs, all_pairs) -> bool:
        decision = super().choose(ddi_pairs, all_pairs)
        self.records.append((float(ddi_pairs), float(all_pairs), decision))
        return decision

    def on_fit_end(self, trainer, pl_module) -> None:
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/ddi-ddp")
    out = Path(parser.parse_args().out)
    cohort = out / "cohort"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the ddp launcher re-runs this script per rank
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("rank*.json"):
            old.unlink()
        if not cohort.exists():
            write_cohort(cohort, n_patients=40)
    while not (cohort / "cohort.json").exists():
        time.sleep(0.1)
    data = VisitSequenceDataModule(root=str(cohort), batch_size=2)
    model = GAMENet(knowledge=data.knowledge, embedding_dim=8, threshold=0.0)
    switch = RecordingAnnealing(str(out), target_ddi=0.0, temperature=0.3, seed=7)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        callbacks=[switch],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    if trainer.global_rank != 0:
        return
    for _ in range(100):
        if (out / "rank1.json").exists():
            break
        time.sleep(0.1)
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    same = [a[2] for a in r0] == [b[2] for b in r1]
    differ = sum(a[:2] != b[:2] for a, b in zip(r0, r1))
    print(
        f"steps {len(r0)}/{len(r1)}; local counts differ in {differ}; DDI-loss steps {sum(a[2] for a in r0)}; "
        f"decisions equal on both ranks: {same}"
    )
    sys.exit(0 if same and len(r0) == len(r1) else 1)


if __name__ == "__main__":
    main()

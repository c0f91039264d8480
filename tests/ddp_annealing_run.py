"""Run by tests/test_ddp_fit.py as ``python tests/ddp_annealing_run.py <out>``: GAMENet fitted on 2 CPU
processes (``strategy="ddp"``, which re-launches this file for rank 1), each rank writing the
DDIAnnealing decisions it took to ``<out>/rank<r>.json``.

A launched script rather than ``ddp_spawn``: spawning pickles the model's tensors through shared
memory, which fails on GAMENet's empty buffers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from callbacks import DDIAnnealing  # noqa: E402
from datamodules.visit_sequence import VisitSequenceDataModule  # noqa: E402
from lightning_modules import GAMENet  # noqa: E402


class RecordingAnnealing(DDIAnnealing):
    """DDIAnnealing that writes (local DDI pairs, local pairs, decision) of every step to a file per rank."""

    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out, self.records = out, []

    def choose(self, ddi_pairs, all_pairs) -> bool:
        decision = super().choose(ddi_pairs, all_pairs)
        self.records.append((float(ddi_pairs), float(all_pairs), decision))
        return decision

    def on_fit_end(self, trainer, pl_module) -> None:
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def main(out: str, cohort: str) -> None:
    data = VisitSequenceDataModule(root=cohort, batch_size=5)
    torch.manual_seed(0)
    # threshold 1e-6: every drug recommended, so a DDI rate of about 0.012 in every batch; target 0 and
    # T = 0.015 make the DDI loss about as likely as not (exp(-0.012 / 0.015) ≈ 0.45)
    model = GAMENet(knowledge=data.knowledge, embedding_dim=8, threshold=1e-6)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        callbacks=[RecordingAnnealing(out, target_ddi=0.0, temperature=0.015, seed=7)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main(*sys.argv[1:3])

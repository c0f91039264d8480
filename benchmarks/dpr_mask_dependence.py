"""How much a trained DPR model's package choice owes to its patient mask layer σ(MLP(u)).

    python benchmarks/dpr_mask_dependence.py --checkpoints wg=<ckpt>[,<ckpt>...] ag=<ckpt>[,...] \
        [--data <folder>] [--out <dir>]

The training-time ablations (AG-Mask, WG without the mask) retrain a model without the layer;
this probe takes a trained model and, on its test visits, swaps the mask out at inference:

* ``learned``: the model as trained (its test F1 of the chosen candidate package);
* ``mean``: every visit gets the same mask, the mean of the test visits' masks, so whatever
  the mask does for every patient alike is kept and what it does per patient is removed;
* ``shuffled``: every visit gets the mask of another visit of its batch.

A model whose choice depends on who the patient is through the mask loses F1 under ``mean``;
one that gives the mask another job (DPR-AG with ``mask_layer: edge``, whose interaction-type loss
reads the masked edge attributes) or none keeps it. F1 is the shared protocol's: per visit, averaged over each
patient's visits, then over patients. Several comma-separated checkpoints under one name are
training seeds: the table gives each and their mean. Writes ``<out>/mask_dependence.md`` and
``mask_dependence.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

from benchmarks.dpr_heuristic import load  # noqa: E402
from benchmarks.provenance import Provenance, file_digest, options_config, write_json, write_markdown  # noqa: E402
from lightning_modules.dpr import DPR  # noqa: E402

MODES = ("learned", "mean", "shuffled")


class ReplacedMask(nn.Module):
    """Stands in for a trained mask layer (it returns the logits of σ(MLP(u))).

    ``mean``: the logits of ``mean_mask`` for every visit; ``shuffled``: the trained layer's
    logits of the batch's visits in a random order (``seed``), so each visit gets another's.
    """

    def __init__(self, layer: nn.Module, mode: str, mean_mask: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if mode not in ("mean", "shuffled"):
            raise ValueError(f"mode must be 'mean' or 'shuffled', got {mode!r}")
        if mode == "mean" and mean_mask is None:
            raise ValueError("mode 'mean' needs mean_mask")
        self.layer, self.mode = layer, mode
        self.mean_logits = None if mean_mask is None else torch.logit(mean_mask.clamp(1e-6, 1 - 1e-6))
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return self.mean_logits.to(u.device, u.dtype).expand(len(u), -1)
        return self.layer(u)[torch.randperm(len(u), generator=self.generator).to(u.device)]


def loop_f1(model: DPR, data) -> float:
    """F1 of the test loop itself (the shared protocol: over the full test set, patient-averaged), on CPU."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return float(metrics["test_all_f1"])


@torch.no_grad()
def mean_mask(model: DPR, data) -> torch.Tensor:
    """Mean of σ(MLP(u)) over the test visits."""
    masks = [model.mask_vectors(move_data_to_device(b, model.device)) for b in data.test_dataloader()]
    return torch.cat(masks).mean(0)


def mask_dependence(model: DPR, data, seed: int = 0) -> dict[str, float]:
    """Test F1 of the chosen package with the learned, the mean and shuffled masks."""
    if not model.hparams.use_mask:
        raise ValueError("the model was trained without its mask layer (use_mask off): nothing to probe")
    model.eval()
    trained, average = model.mask, mean_mask(model, data)
    results = {"learned": loop_f1(model, data)}
    try:
        for mode in MODES[1:]:
            model.mask = ReplacedMask(trained, mode, average, seed)
            results[mode] = loop_f1(model, data)
    finally:
        model.mask = trained
    return results


def report(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "Test F1 of the chosen package with the trained mask, the mean mask, and masks shuffled across visits\n",
        "| model | run | learned | mean mask | shuffled | mean − learned |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        rows = [(str(i + 1), r) for i, r in enumerate(runs)]
        if len(runs) > 1:
            rows.append(("mean", {m: sum(r[m] for r in runs) / len(runs) for m in MODES}))
        for run, r in rows:
            lines.append(
                f"| {name} | {run} | {r['learned']:.4f} | {r['mean']:.4f} | {r['shuffled']:.4f} | "
                f"{r['mean'] - r['learned']:+.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="NAME=CKPT[,CKPT...] (DPR-WG or DPR-AG)")
    parser.add_argument("--data", default=None, help="cohort folder (default: the checkpoint's own data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled masks")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    results = {}
    for spec in opts.checkpoints:
        name, sep, paths = spec.partition("=")
        if not (sep and name and paths):
            parser.error(f"--checkpoints takes NAME=CKPT[,CKPT...], got {spec!r}")
        runs = []
        for path in paths.split(","):
            model, data = load(path, opts.data)
            if not model.hparams.use_mask:
                parser.error(f"{path}: trained without the mask layer (use_mask off): nothing to probe")
            data.setup("test")
            runs.append(mask_dependence(model, data, opts.seed))
        results[name] = runs
    text = report(results)
    print(text)
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints = [path for spec in opts.checkpoints for path in spec.partition("=")[2].split(",")]
        config = {**options_config(opts), "checkpoints": [file_digest(path) for path in checkpoints]}
        provenance = Provenance.capture("benchmarks/dpr_mask_dependence.py", argv, config=config)
        write_markdown(out / "mask_dependence.md", text, provenance)
        write_json(out / "mask_dependence.json", results, provenance)


if __name__ == "__main__":
    main()

"""DPR's package-generation heuristic (§6) against plain candidate choice, on the test patients.

    python benchmarks/dpr_heuristic.py --ckpt <DPR-WG checkpoint> --out <dir> [--data <folder>]
        [--heuristic_high 1.0 ...]

For every test visit: S1 = the packages of the 10 most similar training patients, S2/S3 the
packages the rules derive from them, all scored by the trained DPR model. Reports the F1
(per visit averaged per patient, then over patients, as the shared metrics) of the
non-heuristic choice (best of S1) and the heuristic choice (best of S1 ∪ S2 ∪ S3), how often
the heuristic choice is a generated package, and the oracle F1 of each candidate set (the best
any chooser could do), to ``<dir>/heuristic.md`` and ``heuristic.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

from benchmarks.provenance import Provenance, file_digest, options_config, write_json, write_markdown  # noqa: E402
from datamodules.package_graph import PackageGraphDataModule  # noqa: E402
from lightning_modules.dpr import DPR, set_f1  # noqa: E402
from lightning_modules.package_generation import GenerationRules, to_multi_hot  # noqa: E402
from lightning_modules.recommend import load_model  # noqa: E402


def load(ckpt: str, data_root: str | None, kind: type[DPR] = DPR) -> tuple[DPR, PackageGraphDataModule]:
    """A DPR checkpoint (of class ``kind``) and the package-graph data it was trained on, or ``data_root``."""
    model = load_model(ckpt, kind=kind).eval()
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    options = {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
    options["root"] = data_root if data_root is not None else options.get("root")
    data = PackageGraphDataModule(**options)
    model.knowledge.check_compatible(data.knowledge, what="data")
    return model, data


def patient_mean(values: torch.Tensor, lengths: list[int]) -> float:
    return float(torch.stack([part.mean() for part in values.split(lengths)]).mean())


def evaluate(model: DPR, data: PackageGraphDataModule) -> dict:
    model.refresh_pool(data.candidate_pool())
    columns = {name: [] for name in ("candidate", "heuristic", "oracle_s1", "oracle_all", "generated")}
    lengths = []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch = move_data_to_device(batch, model.device)
            out = model.generate(batch)
            n, slots, _ = out["packages"].shape
            truth = to_multi_hot(batch["package"], model.num_medications)
            hot = to_multi_hot(out["packages"], model.num_medications)
            f1 = set_f1(hot, truth.unsqueeze(1).expand_as(hot))
            f1 = f1.masked_fill(~torch.isfinite(out["scores"]), 0.0)
            rows = torch.arange(n)
            per = slots // 3
            columns["candidate"].append(f1[rows, out["candidate_choice"]])
            columns["heuristic"].append(f1[rows, out["heuristic_choice"]])
            columns["oracle_s1"].append(f1[:, :per].max(1).values)
            columns["oracle_all"].append(f1.max(1).values)
            columns["generated"].append((out["heuristic_choice"] >= per).float())
            lengths += batch["lengths"].tolist()
    seconds = time.perf_counter() - start
    result = {name: patient_mean(torch.cat(values), lengths) for name, values in columns.items()}
    result.update({"test_patients": len(lengths), "test_visits": sum(lengths), "seconds": seconds})
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None)
    for name, value in GenerationRules().__dict__.items():
        parser.add_argument(f"--heuristic_{name}", type=float, default=value)
    opts = parser.parse_args(argv)
    torch.manual_seed(0)
    model, data = load(opts.ckpt, opts.data)
    model.rules = GenerationRules(**{k: getattr(opts, f"heuristic_{k}") for k in GenerationRules().__dict__})
    result = evaluate(model, data)
    result["rules"] = model.rules.__dict__
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = Provenance.capture(
        "benchmarks/dpr_heuristic.py", argv, config={**options_config(opts), "ckpt": file_digest(opts.ckpt)}
    )
    write_json(out / "heuristic.json", result, provenance)
    source = Path(data.root).name if data.root else "synthetic"
    table = (
        f"Package-generation heuristic (DPR §6) on {source}: {result['test_patients']} test patients, "
        f"{result['test_visits']} visits, F1 averaged per patient\n\n"
        "| choice | F1 |\n|---|---|\n"
        f"| best of S1 (candidates of the 10 most similar patients) | {result['candidate']:.4f} |\n"
        f"| best of S1 ∪ S2 ∪ S3 (heuristic) | {result['heuristic']:.4f} |\n"
        f"| oracle over S1 | {result['oracle_s1']:.4f} |\n"
        f"| oracle over S1 ∪ S2 ∪ S3 | {result['oracle_all']:.4f} |\n\n"
        f"Heuristic choices that are generated (S2/S3) packages: {result['generated']:.1%} (per-patient mean). "
        f"Rules: {result['rules']}. {result['seconds']:.1f} s.\n"
    )
    write_markdown(out / "heuristic.md", table, provenance)
    print(table)
    return result


if __name__ == "__main__":
    main()

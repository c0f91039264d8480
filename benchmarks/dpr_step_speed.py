"""Seconds per DPR training step with each message-passing form, on the committed configs.

    python benchmarks/dpr_step_speed.py [--data <folder> | --synthetic_options '{...}']
        [--configs dpr_wg dpr_ag dpr_gnn] [--batches 10] [--threads 1] [--out <file.json>]
        [-- model overrides as init_arg=value ...]

For each config and each ``message_passing`` (``edge_gru``, the paper's GRU cell per edge;
``gated``, a gated graph network) it times the forward and backward pass of the training loss
(BPR + DPR-AG's type loss) on the first ``--batches`` training batches, after one warm-up batch,
and reports the mean and the batch's size in graphs, nodes and edges. NCF pre-training is left
out: a step costs the same whatever the weights. Synthetic default cohort unless ``--data``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import Provenance, options_config, write_json  # noqa: E402
from datamodules.package_graph import PackageGraphDataModule  # noqa: E402
from lightning_modules.dpr import DPR  # noqa: E402

MODES = ("edge_gru", "gated")


def config_parts(name: str) -> tuple[type, dict, dict]:
    """(model class, model init_args, data init_args) of ``configs/<name>.yaml``."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    model = config["model"]
    module, _, cls_name = model["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    if not issubclass(cls, DPR):
        raise ValueError(f"{name}: not a DPR config (model {model['class_path']})")
    return cls, dict(model["init_args"]), dict(config["data"]["init_args"])


def step_seconds(model, batches: list[dict]) -> float:
    """Mean seconds of loss + backward over ``batches[1:]`` (``batches[0]`` warms up)."""
    model.train()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        model.training_loss(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def measure(
    configs: list[str], data_root: str | None, batches: int, overrides: dict, synthetic_options: dict | None = None
) -> list[dict]:
    rows = []
    for name in configs:
        cls, model_args, data_args = config_parts(name)
        data_args["root"] = data_root
        if synthetic_options:
            data_args["synthetic_options"] = synthetic_options
        data = PackageGraphDataModule(**data_args)
        data.setup("fit")
        torch.manual_seed(0)
        taken = list(itertools.islice(data.train_dataloader(), batches + 1))
        if len(taken) < batches + 1:
            raise SystemExit(f"{name}: the training split has {len(taken)} batches, fewer than --batches + 1")
        graphs = [b["graphs"] for b in taken[1:]]
        for mode in MODES:
            torch.manual_seed(0)
            model = cls(knowledge=data.knowledge, **{**model_args, **overrides, "message_passing": mode})
            rows.append(
                {
                    "config": name,
                    "message_passing": mode,
                    "step_seconds": round(step_seconds(model, taken), 4),
                    "graphs": round(sum(g.num_graphs for g in graphs) / len(graphs), 1),
                    "nodes": round(sum(g.num_nodes for g in graphs) / len(graphs), 1),
                    "edges": round(sum(g.num_edges for g in graphs) / len(graphs), 1),
                }
            )
    return rows


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {item!r} is not init_arg=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="cohort source folder (default: synthetic cohort)")
    parser.add_argument("--synthetic_options", type=yaml.safe_load, default=None, help="YAML dict of generator knobs")
    parser.add_argument("--configs", nargs="+", default=["dpr_wg", "dpr_ag", "dpr_gnn"])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(own)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    torch.set_num_threads(args.threads)
    rows = measure(args.configs, args.data, args.batches, parse_overrides(extra), args.synthetic_options)
    print("| config | message_passing | s/step | graphs | nodes | edges |\n|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["config"], r["message_passing"], f"{r['step_seconds']:.3f}", r["graphs"], r["nodes"], r["edges"]]
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.out:
        config = {**options_config(args), "overrides": extra}
        write_json(args.out, rows, Provenance.capture("benchmarks/dpr_step_speed.py", argv, config=config))
    return rows


if __name__ == "__main__":
    main()

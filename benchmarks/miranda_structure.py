"""Structure of the predicted drug combinations (MiranDa paper, structure analysis).

    python benchmarks/miranda_structure.py --out <dir> \
        --checkpoint baseline=<best.ckpt> --checkpoint miranda=<best.ckpt> \
        [--seed 0] [--data <folder>] [--clusters 6] [--neighbours 15]

The checkpoints are the best-validation checkpoints of ``benchmarks/miranda_seeds.py`` for one
seed; the test split is rebuilt from that seed (random 70/15/15, as there). For every test visit
each model's recommended set (probability >= its threshold) is taken; all sets of all models are
embedded together, so the panels share one map:

* UMAP (``umap-learn``, Jaccard distance between the sets) into the hyperboloid model of the
  hyperbolic plane, then mapped to the Poincaré disk (x, y) / (1 + sqrt(1 + x² + y²)), as the
  paper draws it;
* k-means in the disk gives clusters, and TF-IDF over the drugs recommended within each cluster
  (a cluster is one document) names each cluster by its three most characteristic drugs;
* per cluster and model: share of the visits, mean set size, mean real length of stay and mean
  ELOS of the recommended sets (retrieved from the training split with the model's settings).

Writes ``<out>/structure.png`` (one Poincaré-disk panel per model, coloured by cluster),
``<out>/structure.md`` and ``<out>/structure.json``. Needs ``umap-learn``, in the ``bench``
extra (``pip install -e ".[bench]"``), not a dependency of medrec itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from benchmarks.provenance import Provenance, file_digest, options_config, write_json, write_markdown  # noqa: E402
from datamodules.visit_sequence import VisitSequenceDataModule  # noqa: E402
from lightning_modules.base import MedRecModule  # noqa: E402
from lightning_modules.recommend import Recommender  # noqa: E402


def hyperboloid_to_poincare(points: np.ndarray) -> np.ndarray:
    """Map (N, 2) spatial coordinates of the hyperboloid model to the Poincaré disk (N, 2).

    The hyperboloid point (x, y, z) with z = sqrt(1 + x² + y²) maps to (x, y) / (1 + z); the
    image lies strictly inside the unit disk and distances from the origin are preserved in
    the hyperbolic metric.
    """
    points = np.asarray(points, dtype=float)
    z = np.sqrt(1.0 + (points**2).sum(-1, keepdims=True))
    return points / (1.0 + z)


def cluster_themes(sets: np.ndarray, labels: np.ndarray, top: int = 3) -> dict[int, list[int]]:
    """The ``top`` drugs (column indices) with the highest mean TF-IDF in each cluster, best first.

    Each recommended set (a row of ``sets``, (N, M) 0/1) is a document and its drugs its words,
    so a drug in most sets (a ward-routine drug) gets a low IDF; a cluster's theme is the drugs
    whose TF-IDF, averaged over the cluster's sets, is highest.
    """
    from sklearn.feature_extraction.text import TfidfTransformer

    weights = TfidfTransformer().fit_transform(np.asarray(sets, dtype=float)).toarray()
    themes = {}
    for c in np.unique(labels):
        mean = weights[labels == c].mean(0)
        order = [m for m in np.argsort(-mean, kind="stable") if mean[m] > 0][:top]
        themes[int(c)] = [int(m) for m in order]
    return themes


@torch.no_grad()
def predict_test_split(model: MedRecModule, data: VisitSequenceDataModule) -> dict[str, np.ndarray]:
    """Recommended sets, hard-prediction ELOS and real LOS of every test visit (row-major)."""
    model.eval()
    if getattr(model, "stay_index", None) is None:
        model.build_stay_index(data.dataset("train"))
    sets, elos, los = [], [], []
    for batch in data.test_dataloader():
        probs = model.predict_probabilities(batch)
        mask = batch["visit_mask"]
        sets.append((probs[mask] >= model.hparams.threshold).numpy())
        found, stays = model.visit_stays(probs, batch)
        elos.append(found.elos.numpy())
        los.append(stays.numpy())
    return {"sets": np.concatenate(sets), "elos": np.concatenate(elos), "los": np.concatenate(los)}


def embed(sets: np.ndarray, neighbours: int, seed: int) -> np.ndarray:
    """UMAP of the sets (Jaccard distance) into the hyperbolic plane, as Poincaré-disk points."""
    try:
        import umap
    except ImportError as err:  # an analysis extra, not a medrec dependency
        raise SystemExit('miranda_structure.py needs umap-learn: pip install -e ".[bench]"') from err
    reducer = umap.UMAP(
        n_neighbors=neighbours, metric="jaccard", output_metric="hyperboloid", random_state=seed, n_jobs=1
    )
    return hyperboloid_to_poincare(reducer.fit_transform(sets.astype(bool)))


def agreement(first: np.ndarray, other: np.ndarray) -> dict:
    """How far two models' recommended sets for the same visits are apart."""
    inter = (first & other).sum(1)
    union = (first | other).sum(1)
    jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"identical": float((first == other).all(1).mean()), "jaccard": float(jaccard.mean())}


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def summarise(predictions: dict, labels: dict, themes: dict, clusters: int) -> list[dict]:
    rows = []
    for c in range(clusters):
        row = {"cluster": c, "theme": themes.get(c, [])}
        for method, pred in predictions.items():
            inside = labels[method] == c
            row[method] = {
                "share": float(inside.mean()),
                "drugs": float(pred["sets"][inside].sum(1).mean()) if inside.any() else None,
                "los": _mean(pred["los"][inside]),
                "elos": _mean(pred["elos"][inside]),
            }
        rows.append(row)
    return rows


def plot(points: dict, labels: dict, themes: dict, clusters: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10" if clusters <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(points), figsize=(6.2 * len(points), 6.6), squeeze=False)
    for ax, (method, xy) in zip(axes[0], points.items()):
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="black", linewidth=1))
        for c in range(clusters):
            inside = labels[method] == c
            label = f"{c}: {', '.join(themes.get(c, []))} ({inside.mean():.0%})"
            ax.scatter(xy[inside, 0], xy[inside, 1], s=6, alpha=0.6, color=colours(c), label=label)
        ax.set_xlim(-1.02, 1.02)
        ax.set_ylim(-1.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("Poincaré disk x")
        ax.set_ylabel("Poincaré disk y")
        ax.set_title(f"{method}: {len(xy)} recommended test-visit drug sets")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=7, markerscale=3, title="cluster: theme")
    fig.suptitle("Predicted drug combinations, UMAP (Jaccard) into the Poincaré disk, k-means clusters")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=130, bbox_inches="tight")  # keeps the legends below the panels
    plt.close(fig)


def report(payload: dict) -> str:
    methods = payload["methods"]
    lines = [
        "# Structure of the predicted drug combinations",
        "",
        f"Test split of seed {payload['seed']} (random 70/15/15), {payload['visits']} visits; UMAP (Jaccard, "
        f"{payload['neighbours']} neighbours) into the Poincaré disk, k-means with {payload['clusters']} clusters "
        f"fitted on all models' sets together, TF-IDF theme per cluster. {payload['seconds']:.0f} s.",
        "",
        "| cluster | theme (TF-IDF) | " + " | ".join(f"{m} share / drugs / LOS / ELOS" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]

    def cell(fig: dict) -> str:
        def num(v, fmt):
            return "–" if v is None else format(v, fmt)

        return f"{fig['share']:.1%} / {num(fig['drugs'], '.1f')} / {num(fig['los'], '.2f')} / {num(fig['elos'], '.2f')}"

    for row in payload["rows"]:
        lines.append(
            f"| {row['cluster']} | {', '.join(row['theme'])} | " + " | ".join(cell(row[m]) for m in methods) + " |"
        )
    first = methods[0]
    for method, fig in payload["agreement"].items():
        lines.append(
            f"\n{method} vs {first}: identical recommended set for {fig['identical']:.1%} of the visits, "
            f"mean Jaccard between the two sets {fig['jaccard']:.3f}."
        )
    lines += ["", "![structure](structure.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", action="append", required=True, help="name=path, repeatable")
    parser.add_argument("--seed", type=int, default=0, help="the split seed the checkpoints were trained on")
    parser.add_argument("--data", default=None)
    parser.add_argument("--clusters", type=int, default=6)
    parser.add_argument("--neighbours", type=int, default=15)
    opts = parser.parse_args(argv)
    checkpoints = dict(spec.partition("=")[::2] for spec in opts.checkpoint)
    if any(not name or not path for name, path in checkpoints.items()):
        parser.error(f"--checkpoint takes name=path, got {opts.checkpoint}")
    start = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    data = VisitSequenceDataModule(root=opts.data, split="random", split_ratios=(0.7, 0.15, 0.15), seed=opts.seed)
    data.setup("test")
    predictions = {
        name: predict_test_split(Recommender.from_checkpoint(path).model, data) for name, path in checkpoints.items()
    }
    reference = next(iter(predictions.values()))["sets"]
    everything = np.concatenate([p["sets"] for p in predictions.values()])
    points = embed(everything, opts.neighbours, opts.seed)

    from sklearn.cluster import KMeans

    assigned = KMeans(n_clusters=opts.clusters, n_init=10, random_state=opts.seed).fit_predict(points)
    codes = data.knowledge.vocab["medication"]
    names = data.knowledge.medication_names or codes
    top_drugs = cluster_themes(everything, assigned)
    short = {c: [codes[m] for m in drugs] for c, drugs in top_drugs.items()}
    themes = {c: [f"{codes[m]} ({names[m]})" for m in drugs] for c, drugs in top_drugs.items()}
    split_at = np.cumsum([len(p["sets"]) for p in predictions.values()])[:-1]
    per_points = dict(zip(predictions, np.split(points, split_at)))
    per_labels = dict(zip(predictions, np.split(assigned, split_at)))
    plot(per_points, per_labels, short, opts.clusters, out / "structure.png")
    payload = {
        "seed": opts.seed,
        "visits": int(len(next(iter(predictions.values()))["sets"])),
        "methods": list(predictions),
        "clusters": opts.clusters,
        "neighbours": opts.neighbours,
        "rows": summarise(predictions, per_labels, themes, opts.clusters),
        "agreement": {m: agreement(reference, p["sets"]) for m, p in list(predictions.items())[1:]},
        "seconds": time.perf_counter() - start,
    }
    config = {**options_config(opts), "checkpoints": {name: file_digest(path) for name, path in checkpoints.items()}}
    provenance = Provenance.capture("benchmarks/miranda_structure.py", argv, config=config)
    payload = write_json(out / "structure.json", payload, provenance)
    print(write_markdown(out / "structure.md", report(payload), provenance))
    return payload


if __name__ == "__main__":
    main()

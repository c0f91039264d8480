"""DPR's interpretability outputs (paper Tables 7–8, Fig. 8) from trained checkpoints.

    python benchmarks/dpr_interpret.py --wg <DPR-WG ckpt> --ag <DPR-AG ckpt> --out <dir> [--data <folder>]
        [--age A]

On the test patients' own packages:

* ``impact_factors.md`` (Table 7): DPR-WG's contextual impact factors c_vu and effective weights
  ê_vu = c_vu · e_vu, summarised per relation type, and every edge of one example package;
* ``interaction_classes.md`` (Table 8): DPR-AG's personalised interaction-class probabilities
  softmax(ê_vuᵀ Q): agreement with the known relations, and one labelled drug pair as seen in
  the packages of different patients;
* ``mask_projection.png`` (Fig. 8): the DPR-WG mask vectors σ(MLP(u)) of the test visits in
  two dimensions (PCA), coloured by age band (< 45 / 45–65 / ≥ 65; with ``--age A``, < A / ≥ A),
  or by package size where ages are unknown; ``mask_projection.md``: the variance the two
  components explain and, with ages, how well each one alone separates the visits aged ≥ A
  (AUC, folded to ≥ 0.5 because a component's sign is arbitrary; A = 60 without ``--age``);
  ``mask_projection_ag.*`` the same for DPR-AG's mask (on the edge attributes or the drug
  embeddings, its ``mask_layer``). A model trained without its mask layer gets none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

from benchmarks.dpr_heuristic import load  # noqa: E402
from benchmarks.provenance import Provenance, file_digest, options_config, write_markdown  # noqa: E402
from lightning_modules.dpr import DPRAG, DPRWG, INTERACTION_CLASSES  # noqa: E402

RELATION_NAMES = {0: "none", 1: "synergy", 2: "antagonism", -1: "unknown"}


def collect(model, data) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Per-edge explanations of every test visit's own package, mask vectors, visit info."""
    edges, masks, visits = [], [], []
    offset = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch = move_data_to_device(batch, model.device)
            out = model.explain(batch, batch["package"])
            out["owner"] = out["owner"] + offset
            edges.append({k: v.cpu().numpy() for k, v in out.items() if k != "score"})
            masks.append(model.mask_vectors(batch).cpu().numpy())
            for row in batch["visit_row"].tolist():
                visits.append({"row": row, "size": len(data.table.package[row])})
            offset += len(batch["visit_row"])
    merged = {k: np.concatenate([e[k] for e in edges]) for k in edges[0]}
    return merged, np.concatenate(masks), visits


def drug_name(knowledge, index: int) -> str:
    code = knowledge.vocab["medication"][index]
    names = knowledge.medication_names
    return f"{code} {names[index]}" if names else code


def impact_report(model, data, edges: dict[str, np.ndarray], visits: list[dict]) -> str:
    k = model.knowledge
    lines = [
        "DPR-WG contextual impact factors on the test patients' own packages (Table 7)\n",
        "| relation | edges | e_vu mean | c_vu mean ± std | ê_vu mean ± std |",
        "|---|---|---|---|---|",
    ]
    for code, name in RELATION_NAMES.items():
        sel = edges["relation"] == code
        if sel.any():
            c, e_hat = edges["impact"][sel], edges["effective_weight"][sel]
            lines.append(
                f"| {name} | {int(sel.sum())} | {edges['weight'][sel].mean():.3f} | "
                f"{c.mean():.3f} ± {c.std():.3f} | {e_hat.mean():.3f} ± {e_hat.std():.3f} |"
            )
    labelled = np.bincount(edges["owner"][np.isin(edges["relation"], [1, 2])], minlength=len(visits))
    example = int(labelled.argmax())
    sel = edges["owner"] == example
    row = visits[example]["row"]
    lines += [
        "",
        f"Example: visit {data.table.visit_id[row]} (package of {visits[example]['size']} drugs, "
        f"{int(sel.sum())} edges); labelled edges first",
        "",
        "| drug v | drug u | R_vu | p_vu | e_vu | c_vu | ê_vu |",
        "|---|---|---|---|---|---|---|",
    ]
    order = np.argsort(~np.isin(edges["relation"][sel], [1, 2]), kind="stable")
    for i in np.flatnonzero(sel)[order][:25]:
        lines.append(
            f"| {drug_name(k, edges['drug_v'][i])} | {drug_name(k, edges['drug_u'][i])} | "
            f"{RELATION_NAMES[int(edges['relation'][i])]} | {edges['cooccurrence'][i]:.3f} | "
            f"{edges['weight'][i]:.3f} | {edges['impact'][i]:.3f} | {edges['effective_weight'][i]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def class_report(model, data, edges: dict[str, np.ndarray], visits: list[dict]) -> str:
    k = model.knowledge
    probs, relation = edges["class_probabilities"], edges["relation"]
    lines = [
        "DPR-AG personalised interaction-class probabilities on the test packages (Table 8)\n",
        "| known relation | edges | mean P(none) | mean P(synergy) | mean P(antagonism) | argmax = known |",
        "|---|---|---|---|---|---|",
    ]
    for code in (0, 1, 2, -1):
        sel = relation == code
        if sel.any():
            agree = f"{(probs[sel].argmax(1) == code).mean():.3f}" if code >= 0 else "–"
            p = probs[sel].mean(0)
            figures = " | ".join(f"{x:.3f}" for x in p)
            lines.append(f"| {RELATION_NAMES[code]} | {int(sel.sum())} | {figures} | {agree} |")
    pairs = {}
    for i in np.flatnonzero(np.isin(relation, [1, 2])):
        pairs.setdefault((int(edges["drug_v"][i]), int(edges["drug_u"][i])), []).append(i)
    if pairs:
        (v, u), hits = max(pairs.items(), key=lambda kv: len(kv[1]))
        lines += [
            "",
            f"One pair in different patients' packages: {drug_name(k, v)} → {drug_name(k, u)} "
            f"(known: {RELATION_NAMES[int(relation[hits[0]])]}, {len(hits)} packages)",
            "",
            "| visit | " + " | ".join(f"P({c})" for c in INTERACTION_CLASSES) + " |",
            "|---|---|---|---|",
        ]
        for i in hits[:8]:
            row = visits[int(edges["owner"][i])]["row"]
            lines.append(f"| {data.table.visit_id[row]} | " + " | ".join(f"{p:.3f}" for p in probs[i]) + " |")
        spread = probs[hits].std(0)
        lines.append(
            "\nStd of the class probabilities across those patients: "
            + ", ".join(f"{c} {s:.3f}" for c, s in zip(INTERACTION_CLASSES, spread))
        )
    return "\n".join(lines) + "\n"


def mask_projection(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(visits, dim) mask vectors -> their first two principal components and the variance share of each."""
    centred = torch.as_tensor(masks - masks.mean(0), dtype=torch.float64)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:2].T).numpy(), (s[:2] ** 2 / (s**2).sum()).numpy()


def separation_auc(score: np.ndarray, group: np.ndarray) -> float:
    """AUC of ``score`` for the ``group`` visits against the others, folded to >= 0.5 (ties count half)."""
    from scipy.stats import rankdata

    n1, n0 = int(group.sum()), int((~group).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("both groups need visits to compare")
    auc = (rankdata(score)[group].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(max(auc, 1 - auc))


def visit_ages(data, visits: list[dict]) -> np.ndarray | None:
    if "age" not in data.cohort.visits:
        return None
    ages = data.cohort.visits["age"].to_numpy(dtype=float)[[v["row"] for v in visits]]
    return None if np.isnan(ages).all() else ages


def mask_report(data, masks: np.ndarray, visits: list[dict], age: float, variant: str = "DPR-WG") -> str:
    xy, explained = mask_projection(masks)
    lines = [
        f"{variant} mask vectors σ(MLP(u)) of the test visits (Fig. 8)\n",
        f"{len(visits)} visits; PC1 explains {explained[0]:.1%} of the variance, PC2 {explained[1]:.1%}.",
    ]
    ages = visit_ages(data, visits)
    if ages is not None:  # visits of unknown age are left out of the comparison
        xy, ages = xy[~np.isnan(ages)], ages[~np.isnan(ages)]
    if ages is not None and (ages >= age).any() and (ages < age).any():
        old = ages >= age
        lines += [
            "",
            f"| component | mean, age < {age:g} | mean, age ≥ {age:g} | AUC for age ≥ {age:g} |",
            "|---|---|---|---|",
        ]
        for i in range(2):
            auc = separation_auc(xy[:, i], old)
            lines.append(f"| PC{i + 1} | {xy[~old, i].mean():.3f} | {xy[old, i].mean():.3f} | {auc:.3f} |")
        lines.append(f"\n{int((~old).sum())} visits aged < {age:g}, {int(old.sum())} aged ≥ {age:g}.")
    elif ages is not None:
        lines.append(f"\nEvery visit is on one side of age {age:g}: no separation to measure.")
    return "\n".join(lines) + "\n"


def mask_plot(
    data, masks: np.ndarray, visits: list[dict], path: Path, age: float | None = None, variant: str = "DPR-WG"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy, explained = mask_projection(masks)
    ages = visit_ages(data, visits)
    fig, ax = plt.subplots(figsize=(6, 5))
    if ages is not None:
        bands = (
            [(f"< {age:g}", 0, age, "tab:green"), (f"≥ {age:g}", age, np.inf, "tab:purple")]
            if age is not None
            else [("< 45", 0, 45, "tab:green"), ("45–65", 45, 65, "tab:orange"), ("≥ 65", 65, np.inf, "tab:purple")]
        )
        for label, lo, hi, colour in bands:
            sel = (ages >= lo) & (ages < hi)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.6, c=colour, label=f"age {label}")
        ax.legend(markerscale=2)
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.6, c=[v["size"] for v in visits], cmap="viridis")
        fig.colorbar(points, ax=ax, label="package size")
    ax.set_xlabel(f"PC1 ({explained[0]:.0%})")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%})")
    ax.set_title(f"{variant} mask vectors σ(MLP(u)) of the test visits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_mask_outputs(
    model, data, masks, visits, out: Path, suffix: str, age: float | None, provenance: Provenance
) -> None:
    """``mask_projection{suffix}.png`` and ``.md``; none for a model trained without its mask layer, whose mask
    weights were never trained."""
    variant = type(model).__name__.replace("DPR", "DPR-")
    if not model.hparams.use_mask:
        print(f"{variant} was trained without its mask layer (use_mask: false): no mask projection")
        return
    mask_plot(data, masks, visits, out / f"mask_projection{suffix}.png", age, variant)
    text = mask_report(data, masks, visits, 60.0 if age is None else age, variant)
    write_markdown(out / f"mask_projection{suffix}.md", text, provenance)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wg", required=True, help="DPR-WG checkpoint")
    parser.add_argument("--ag", default=None, help="DPR-AG checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--age", type=float, default=None, help="colour the mask projection by age < A / >= A")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = {"wg": file_digest(opts.wg), "ag": file_digest(opts.ag) if opts.ag else None}
    provenance = Provenance.capture("benchmarks/dpr_interpret.py", argv, config={**options_config(opts), **checkpoints})
    wg, data = load(opts.wg, opts.data, DPRWG)
    edges, masks, visits = collect(wg, data)
    write_markdown(out / "impact_factors.md", impact_report(wg, data, edges, visits), provenance)
    write_mask_outputs(wg, data, masks, visits, out, "", opts.age, provenance)
    if opts.ag:
        ag, data = load(opts.ag, opts.data, DPRAG)
        edges, masks, visits = collect(ag, data)
        write_markdown(out / "interaction_classes.md", class_report(ag, data, edges, visits), provenance)
        write_mask_outputs(ag, data, masks, visits, out, "_ag", opts.age, provenance)
    for name in ("impact_factors.md", "interaction_classes.md", "mask_projection.md", "mask_projection_ag.md"):
        if (out / name).exists():
            print((out / name).read_text())


if __name__ == "__main__":
    main()

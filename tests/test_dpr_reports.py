"""benchmarks/dpr_heuristic.py (§6 against plain choice) and benchmarks/dpr_interpret.py (Tables 7–8, Fig. 8)
run from saved checkpoints, as a user runs them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import dpr_heuristic, dpr_interpret  # noqa: E402
from datamodules.package_graph import PackageGraphDataModule  # noqa: E402
from lightning_modules.dpr import DPRAG, DPRWG  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

SMALL = {"embedding_dim": 16, "hidden_dim": 16, "dropout": 0.0, "pretrain_epochs": 1}


@pytest.fixture(scope="module")
def checkpoints(tiny_cohort_dir, tmp_path_factory):
    """Briefly trained DPR-WG, DPR-AG (`drug` mask) and structure-only GNN checkpoints, each with its test-loop F1."""
    folder = tmp_path_factory.mktemp("dpr_reports")
    saved = {}
    gnn = {"use_mask": False, "use_context": False, "edge_weights": "structure"}
    for name, cls, options in (("wg", DPRWG, {}), ("ag", DPRAG, {"mask_layer": "drug"}), ("gnn", DPRWG, gnn)):
        L.seed_everything(0)
        data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16, negative_packages=4)
        data.setup("fit")
        model = cls(knowledge=data.knowledge, **SMALL, **options)
        run = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, default_root_dir=folder)
        run.fit(model, datamodule=data)
        path = folder / f"{name}.ckpt"
        run.save_checkpoint(path)
        (metrics,) = run.test(model, datamodule=data, verbose=False)
        saved[name] = (str(path), metrics["test_all_f1"])
    return saved


def test_heuristic_report_plain_choice_is_the_test_loops_and_oracles_bound_the_choices(checkpoints, tmp_path):
    path, test_f1 = checkpoints["wg"]
    result = dpr_heuristic.main(["--ckpt", path, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "heuristic.json").read_text())
    assert saved.pop("provenance")["command"] == f"python benchmarks/dpr_heuristic.py --ckpt {path} --out {tmp_path}"
    assert saved == result
    # the benchmark's non-heuristic choice is the one the model's own test loop scores
    assert result["candidate"] == pytest.approx(test_f1, abs=1e-6)
    assert result["oracle_all"] >= result["oracle_s1"] >= result["candidate"]
    assert result["oracle_all"] >= result["heuristic"] > 0
    assert 0 < result["generated"] <= 1  # S2/S3 packages are chosen for some visits
    table = (tmp_path / "heuristic.md").read_text()
    assert f"| best of S1 ∪ S2 ∪ S3 (heuristic) | {result['heuristic']:.4f} |" in table


def test_heuristic_rules_come_from_the_command_line(checkpoints, tmp_path):
    path, _ = checkpoints["wg"]
    # no drug is high in l (nothing added), none rare in S1 (S2 drops nothing), no pair co-occurs below 0
    # (S3 drops nothing): S2 and S3 repeat S1, so the heuristic can only choose what plain choice does
    options = ["--heuristic_high", "0", "--heuristic_rare", "0", "--heuristic_seldom", "0"]
    result = dpr_heuristic.main(["--ckpt", path, "--out", str(tmp_path), *options])
    assert result["rules"]["high"] == result["rules"]["rare"] == result["rules"]["seldom"] == 0.0
    assert result["heuristic"] == pytest.approx(result["candidate"], abs=1e-6)
    assert result["oracle_all"] == pytest.approx(result["oracle_s1"], abs=1e-6)


def test_interpretability_outputs_tables_7_and_8_and_the_mask_projection(checkpoints, tiny_cohort_dir, tmp_path):
    wg, ag = checkpoints["wg"][0], checkpoints["ag"][0]
    dpr_interpret.main(["--wg", wg, "--ag", ag, "--out", str(tmp_path), "--data", str(tiny_cohort_dir)])
    assert (tmp_path / "mask_projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    impact = (tmp_path / "impact_factors.md").read_text()
    for relation in ("none", "synergy", "antagonism"):
        assert f"| {relation} | " in impact
    # a synergy edge has e_vu = +1 and an antagonism edge -1, so ê_vu = c_vu · e_vu gives back ±c_vu
    rows = dict(re.findall(r"^\| (synergy|antagonism) \| \d+ \| (.*) \|$", impact, re.M))
    for relation, sign in (("synergy", 1), ("antagonism", -1)):
        weight, impact_mean, effective_mean = (cell.split(" ± ")[0] for cell in rows[relation].split(" | "))
        assert float(weight) == sign and float(effective_mean) == pytest.approx(sign * float(impact_mean), abs=2e-3)
    classes = (tmp_path / "interaction_classes.md").read_text()
    row = r"^\| (none|synergy|antagonism|unknown) \| \d+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|"
    rows = re.findall(row, classes, re.M)
    assert {r[0] for r in rows} >= {"none", "synergy", "antagonism"}
    for _, *probabilities in rows:  # class probabilities of an edge sum to one, so do their means
        assert sum(map(float, probabilities)) == pytest.approx(1.0, abs=2e-3)
    assert "One pair in different patients' packages" in classes
    projection = (tmp_path / "mask_projection.md").read_text()
    assert "PC1 explains" in projection and "| PC1 | " in projection and "AUC for age ≥ 60 |" in projection
    header, body = (tmp_path / "mask_projection_ag.md").read_text().split("\n\n", 1)
    assert header.startswith("Command: `python benchmarks/dpr_interpret.py --wg ") and body.startswith("DPR-AG mask")
    assert (tmp_path / "mask_projection_ag.png").is_file()


def test_mask_projection_splits_at_the_age_asked_for(checkpoints, tmp_path):
    dpr_interpret.main(["--wg", checkpoints["wg"][0], "--out", str(tmp_path), "--age", "45"])
    projection = (tmp_path / "mask_projection.md").read_text()
    (auc,) = re.findall(r"^\| PC1 \| [-\d.]+ \| [-\d.]+ \| ([\d.]+) \|$", projection, re.M)
    assert "AUC for age ≥ 45 |" in projection and 0.5 <= float(auc) <= 1.0


def test_interpretability_without_a_dpr_ag_checkpoint_writes_table_7_only(checkpoints, tmp_path):
    dpr_interpret.main(["--wg", checkpoints["wg"][0], "--out", str(tmp_path)])
    assert (tmp_path / "impact_factors.md").is_file() and not (tmp_path / "interaction_classes.md").exists()
    assert not (tmp_path / "mask_projection_ag.md").exists()


def test_a_model_trained_without_its_mask_gets_no_mask_projection(checkpoints, tmp_path, capsys):
    dpr_interpret.main(["--wg", checkpoints["gnn"][0], "--out", str(tmp_path)])
    assert (tmp_path / "impact_factors.md").is_file()
    assert not (tmp_path / "mask_projection.png").exists() and not (tmp_path / "mask_projection.md").exists()
    assert "trained without its mask layer" in capsys.readouterr().out


def test_separation_auc_by_hand():
    group = np.array([False, False, True, True])
    assert dpr_interpret.separation_auc(np.array([1.0, 2.0, 3.0, 4.0]), group) == 1.0
    assert dpr_interpret.separation_auc(np.array([4.0, 3.0, 2.0, 1.0]), group) == 1.0  # a component's sign is arbitrary
    # group ranks 2 and 4: (2 + 4 - 3) / (2 * 2)
    assert dpr_interpret.separation_auc(np.array([1.0, 3.0, 2.0, 4.0]), group) == 0.75
    assert dpr_interpret.separation_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5  # a tie counts half
    with pytest.raises(ValueError, match="both groups"):
        dpr_interpret.separation_auc(np.array([1.0, 2.0]), np.array([True, True]))


def test_mask_projection_finds_the_one_direction_masks_vary_in():
    direction = np.array([0.6, 0.8, 0.0])
    masks = 0.5 + np.outer(np.linspace(-0.3, 0.3, 7), direction)
    xy, explained = dpr_interpret.mask_projection(masks)
    assert explained[0] == pytest.approx(1.0) and explained[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(np.abs(xy[:, 0]), np.abs(np.linspace(-0.3, 0.3, 7)), atol=1e-12)
    np.testing.assert_allclose(xy[:, 1], 0.0, atol=1e-12)


def test_mask_report_leaves_visits_of_unknown_age_out():
    from types import SimpleNamespace

    import pandas as pd

    data = SimpleNamespace(cohort=SimpleNamespace(visits=pd.DataFrame({"age": [30.0, 70.0, np.nan, 40.0, 80.0]})))
    masks = np.array([[0.1, 0.5], [0.9, 0.5], [0.5, 0.9], [0.2, 0.4], [0.8, 0.6]])
    text = dpr_interpret.mask_report(data, masks, [{"row": i} for i in range(5)], age=60.0)
    assert "5 visits;" in text and "2 visits aged < 60, 2 aged ≥ 60." in text
    (auc,) = re.findall(r"^\| PC1 \| [-\d.]+ \| [-\d.]+ \| ([\d.]+) \|$", text, re.M)
    assert float(auc) == 1.0  # the first component runs from the young to the old visits
    one_side = dpr_interpret.mask_report(data, masks, [{"row": i} for i in range(5)], age=20.0)
    assert "Every visit is on one side of age 20" in one_side


def test_a_checkpoint_of_the_wrong_model_is_refused_with_what_is_needed(checkpoints, tmp_path):
    from datamodules.cohort import CohortError

    with pytest.raises(CohortError, match="a DPRAG checkpoint, where a DPRWG checkpoint is needed"):
        dpr_interpret.main(["--wg", checkpoints["ag"][0], "--out", str(tmp_path)])
    with pytest.raises(CohortError, match="a DPRWG checkpoint, where a DPRAG checkpoint is needed"):
        dpr_interpret.main(["--wg", checkpoints["wg"][0], "--ag", checkpoints["gnn"][0], "--out", str(tmp_path)])
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CohortError, match="not a medrec checkpoint"):
        dpr_heuristic.main(["--ckpt", str(tmp_path / "other.ckpt"), "--out", str(tmp_path)])


def test_interpret_refuses_an_age_that_is_not_a_number(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        dpr_interpret.main(["--wg", checkpoints["wg"][0], "--out", str(tmp_path), "--age", "old"])
    assert "--age: invalid float value: 'old'" in capsys.readouterr().err

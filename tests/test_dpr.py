"""DPR models: losses, batched graph scoring, NCF/NN baselines, heuristic rules, explanations."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from datamodules.cohort import CohortError
from datamodules.errors import CheckpointError
from datamodules.package_graph import PackageGraphDataModule, pad_packages, split_package_graphs
from lightning_modules.dpr import DPRAG, DPRWG, PRETRAIN_AXIS, log_stage_figures
from lightning_modules.edge_gru import AttributedEdgeGRUConv, EdgeGRUNetwork
from lightning_modules.layers import AttributedGraphConv
from lightning_modules.ncf import NCF, bpr_drug_loss, pretrain_ncf
from lightning_modules.package_generation import (
    GenerationRules,
    mind_interactions,
    personal_rank,
    personalise,
    set_f1,
    to_index_lists,
    to_multi_hot,
)
from lightning_modules.package_rec import bpr_package_loss, package_probabilities
from lightning_modules.sparse_aggregation import SparseGatedGraphConv

SMALL = {"embedding_dim": 16, "hidden_dim": 16, "dropout": 0.0, "pretrain_epochs": 1}


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


@pytest.fixture(scope="module")
def data(tiny_cohort_dir):
    data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16, negative_packages=4)
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def train_batch(data):
    torch.manual_seed(0)
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def eval_batch(data):
    return next(iter(data.val_dataloader()))


# --- losses -------------------------------------------------------------------------------
def test_bpr_package_loss_rewards_ranking_the_true_package_first():
    positive = torch.tensor([2.0], requires_grad=True)
    negatives = torch.tensor([[0.0, 1.0]])
    loss = bpr_package_loss(positive, negatives)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2)
    assert loss < math.log(2) < bpr_package_loss(torch.tensor([-2.0]), negatives)
    loss.backward()
    assert positive.grad < 0  # descending the loss raises the true package's score
    missing = torch.tensor([[0.0, 1.0, float("-inf")]])
    assert bpr_package_loss(torch.tensor([2.0]), missing) == pytest.approx(loss.item())


def test_bpr_drug_loss_compares_prescribed_with_unprescribed_drugs_only():
    hot = torch.tensor([[1.0, 0.0, 0.0]])
    good, bad = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 3.0]])
    assert bpr_drug_loss(good, hot) == pytest.approx(math.log1p(math.exp(-3)))
    assert bpr_drug_loss(bad, hot) == pytest.approx(math.log1p(math.exp(3)))
    # scores among unprescribed drugs do not matter
    assert bpr_drug_loss(torch.tensor([[3.0, 0.0, -5.0]]), hot) != bpr_drug_loss(good, hot)
    assert bpr_drug_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])) == pytest.approx(
        (math.log1p(math.exp(-1)) + math.log(2)) / 2
    )


def test_package_probabilities_recommend_exactly_the_chosen_package():
    packages = torch.tensor([[[0, 1, -1], [1, 2, 3], [-1, -1, -1]]])
    scores = torch.tensor([[0.2, 1.0, float("-inf")]])
    probs = package_probabilities(packages, scores, torch.tensor([1]), 5)
    assert (probs >= 0.5).nonzero()[:, 1].tolist() == [1, 2, 3]
    assert probs[0, 0] > probs[0, 4] == 0  # drug 0 is in a candidate, drug 4 in none
    assert probs[0, 1] > probs[0, 2]  # both candidates hold drug 1


# --- models -------------------------------------------------------------------------------
@pytest.mark.parametrize("message_passing", ["edge_gru", "gated"])
@pytest.mark.parametrize(
    ("cls", "options"), [(DPRWG, {}), (DPRAG, {}), (DPRAG, {"mask_layer": "drug"})], ids=["wg", "ag", "ag_drug_mask"]
)
def test_batched_scores_equal_scores_of_each_graph_alone(cls, options, message_passing, data, train_batch):
    torch.manual_seed(0)
    model = cls(knowledge=data.knowledge, message_passing=message_passing, **options, **SMALL).eval()
    graphs = train_batch["graphs"]
    u = model.encoder(train_batch)
    together = model.package_scores(u, graphs)[0]
    builder = model.graph_builder
    alone = []
    for i, graph in enumerate(split_package_graphs(graphs)[:12]):
        single = builder.build(graph.x.unsqueeze(0))
        single.owner = graphs.owner[i : i + 1]
        alone.append(model.package_scores(u, single)[0])
    torch.testing.assert_close(together[:12], torch.cat(alone), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("cls", "default", "per_edge", "gated"),
    [
        (DPRWG, "edge_gru", EdgeGRUNetwork, SparseGatedGraphConv),
        (DPRAG, "gated", AttributedEdgeGRUConv, AttributedGraphConv),
    ],
)
def test_message_passing_selects_the_layers_wg_per_edge_and_ag_gated_by_default(cls, default, per_edge, gated, data):
    def layer_types(model):
        return {type(m) for m in model.modules()}

    model = cls(knowledge=data.knowledge, **SMALL)
    assert model.hparams.message_passing == default
    assert (per_edge if default == "edge_gru" else gated) in layer_types(model)
    assert gated not in layer_types(cls(knowledge=data.knowledge, message_passing="edge_gru", **SMALL))
    assert per_edge in layer_types(cls(knowledge=data.knowledge, message_passing="edge_gru", **SMALL))
    assert gated in layer_types(cls(knowledge=data.knowledge, message_passing="gated", **SMALL))
    with pytest.raises(ValueError, match="message_passing must be 'edge_gru' or 'gated'"):
        cls(knowledge=data.knowledge, message_passing="gcn", **SMALL)


def test_ag_mask_layer_masks_the_edge_attributes_or_the_drug_embeddings(data, train_batch):
    graphs = train_batch["graphs"]
    src, dst = graphs.edge_index
    owner_of_node, owner_of_edge = graphs.owner[graphs.batch], graphs.owner[graphs.batch[src]]
    torch.manual_seed(0)
    edge = DPRAG(knowledge=data.knowledge, **SMALL).eval()
    assert edge.hparams.mask_layer == "edge"  # the default
    assert edge.mask.out_features == edge.hparams.edge_dim
    u = edge.encoder(train_batch)
    d = edge.drugs(graphs.x)
    torch.testing.assert_close(edge.node_inputs(u, graphs), d)
    unmasked = edge.edge_out(edge.edge_in(d, src, dst))
    torch.testing.assert_close(
        edge.edge_attributes(u, graphs, d), torch.sigmoid(edge.mask(u))[owner_of_edge] * unmasked
    )

    torch.manual_seed(0)
    drug = DPRAG(knowledge=data.knowledge, mask_layer="drug", **SMALL).eval()
    assert drug.mask.out_features == SMALL["embedding_dim"]
    u = drug.encoder(train_batch)
    masked = torch.sigmoid(drug.mask(u))[owner_of_node] * drug.drugs(graphs.x)
    torch.testing.assert_close(drug.node_inputs(u, graphs), masked)  # DPR-WG's d̂_v
    # the attributes are built from d̂ and not masked again
    torch.testing.assert_close(drug.edge_attributes(u, graphs, masked), drug.edge_out(drug.edge_in(masked, src, dst)))
    h0, h, _ = drug.graph_nodes(u, graphs)
    torch.testing.assert_close(h0, masked)
    # with the mask layer off (the AG-Mask ablation) both forms are the same network
    torch.manual_seed(0)
    plain_drug = DPRAG(knowledge=data.knowledge, mask_layer="drug", use_mask=False, **SMALL).eval()
    torch.manual_seed(0)
    plain_edge = DPRAG(knowledge=data.knowledge, mask_layer="edge", use_mask=False, **SMALL).eval()
    unused_mask = {"mask.weight", "mask.bias"}
    plain_edge.load_state_dict({k: v for k, v in plain_drug.state_dict().items() if k not in unused_mask}, strict=False)
    u = plain_drug.encoder(train_batch)
    torch.testing.assert_close(plain_drug.package_scores(u, graphs)[0], plain_edge.package_scores(u, graphs)[0])
    with pytest.raises(ValueError, match="mask_layer must be 'edge' or 'drug'"):
        DPRAG(knowledge=data.knowledge, mask_layer="node", **SMALL)


def test_a_checkpoint_loads_only_into_its_own_mask_layer(data, train_batch, tmp_path):
    trainer = quiet_trainer(max_steps=1)
    drug = DPRAG(knowledge=data.knowledge, mask_layer="drug", **SMALL)
    trainer.fit(drug, datamodule=data)
    trainer.save_checkpoint(tmp_path / "drug.ckpt")
    assert DPRAG.from_checkpoint(str(tmp_path / "drug.ckpt")).hparams.mask_layer == "drug"
    # a model a config built with the other mask (train.py ... --ckpt_path) is told which setting loads it
    with pytest.raises(ValueError, match="trained with mask_layer='drug'.*--model.init_args.mask_layer=drug"):
        DPRAG(knowledge=data.knowledge, **SMALL).on_load_checkpoint(
            torch.load(tmp_path / "drug.ckpt", weights_only=False)
        )


def test_dot_score_head_adds_the_patient_package_product(data, train_batch):
    torch.manual_seed(0)
    model = DPRWG(knowledge=data.knowledge, score_head="mlp_dot", **SMALL).eval()
    assert DPRWG(knowledge=data.knowledge, **SMALL).score_query is None  # the paper's head
    graphs = train_batch["graphs"]
    u = model.encoder(train_batch)
    with_product = model.package_scores(u, graphs)[0]
    h0, h, _ = model.graph_nodes(u, graphs)
    g = model.readout(h0, h, graphs)
    product = (model.score_query(u)[graphs.owner] * g).sum(-1)
    assert product.abs().mean() > 1e-3
    with torch.no_grad():
        model.score_query.weight.zero_()
    torch.testing.assert_close(with_product - product, model.package_scores(u, graphs)[0])
    with pytest.raises(ValueError, match="score_head must be 'mlp' or 'mlp_dot'"):
        DPRWG(knowledge=data.knowledge, score_head="dot", **SMALL)


@pytest.mark.parametrize("cls", [DPRWG, DPRAG])
def test_dpr_learns_to_rank_true_packages_above_negatives(cls, data, train_batch):
    torch.manual_seed(0)
    model = cls(knowledge=data.knowledge, **SMALL)
    model.initialise_from_ncf()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.training_loss(train_batch)
    for _ in range(25):
        losses = model.training_loss(train_batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert losses["bpr"] < 0.5 * first["bpr"]
    if cls is DPRAG:
        assert losses["type"] < first["type"]  # interaction types are learnt from the edges
    model.eval()
    y = model.package_scores(model.encoder(train_batch), train_batch["graphs"])[0].view(16, -1)
    assert (y[:, :1] > y[:, 1:]).float().mean() > 0.9


def test_similar_negatives_come_from_other_patients_and_other_packages(data, train_batch):
    torch.manual_seed(0)
    model = DPRWG(knowledge=data.knowledge, **SMALL, similar_negatives=3).eval()
    model.refresh_pool(data.candidate_pool())
    hard = model.similar_negatives(train_batch)
    assert hard.shape[:2] == (16, 3) and (hard[..., 0] >= 0).all()
    pool = data.candidate_pool()
    packages = [set(p[p >= 0].tolist()) for p in pool["packages"]]
    owners = {}
    for key, pid in zip(pool["patient_key"].tolist(), pool["package_id"].tolist()):
        owners.setdefault(pid, set()).add(key)
    for i in range(16):
        own = set(train_batch["package"][i][train_batch["package"][i] >= 0].tolist())
        for negative in hard[i]:
            drugs = set(negative[negative >= 0].tolist())
            assert drugs != own
            pid = packages.index(drugs)
            assert owners[pid] - {int(train_batch["patient_key"][i])}  # held by another patient
    losses = model.train().training_loss(train_batch)
    assert torch.isfinite(losses["loss"])


def test_pretraining_lowers_ncf_bpr_and_initialises_dpr(data):
    torch.manual_seed(0)
    model = DPRWG(knowledge=data.knowledge, **{**SMALL, "pretrain_epochs": 4, "pretrain_lr": 1e-2})
    history = model.pretrain()  # a stage of its own: the knowledge's training visits, no trainer or DataModule
    assert len(history) == 4 and history[-1] < history[0]
    torch.manual_seed(0)
    again = DPRWG(knowledge=data.knowledge, **SMALL)
    assert pretrain_ncf(again.ncf, data.knowledge.training_visits.loader(data.knowledge.num_medications), 4, 1e-2) == (
        history
    )
    assert not any(p.requires_grad for p in model.ncf.parameters())  # frozen again afterwards
    model.initialise_from_ncf()
    assert torch.equal(model.drugs.weight, model.ncf.drugs.weight)


def test_dpr_starts_from_an_ncf_checkpoint(data, tmp_path):
    from lightning_modules.base import KNOWLEDGE_KEY

    torch.manual_seed(0)
    ncf = NCF(knowledge=data.knowledge, embedding_dim=16, hidden_dim=16)
    torch.save({"state_dict": ncf.state_dict(), KNOWLEDGE_KEY: data.knowledge.to_state()}, tmp_path / "ncf.ckpt")
    model = DPRAG(knowledge=data.knowledge, **SMALL, ncf_checkpoint=str(tmp_path / "ncf.ckpt"))
    model.load_ncf(str(tmp_path / "ncf.ckpt"))
    model.initialise_from_ncf()
    assert torch.equal(model.ncf.drugs.weight, ncf.core.drugs.weight)
    assert torch.equal(model.encoder.document.weight, ncf.core.encoder.document.weight)
    # a checkpoint that is not medrec's, or of another disease-document vocabulary, is refused
    torch.save({"state_dict": ncf.state_dict()}, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match=r"bare.ckpt: not a medrec checkpoint \(no cohort_knowledge\)"):
        model.load_ncf(str(tmp_path / "bare.ckpt"))
    other = {**data.knowledge.to_state(), "document_vocab": [*data.knowledge.document_vocab, "extra"]}
    torch.save({"state_dict": ncf.state_dict(), KNOWLEDGE_KEY: other}, tmp_path / "other.ckpt")
    with pytest.raises(CohortError, match="different disease-document vocabulary"):
        model.load_ncf(str(tmp_path / "other.ckpt"))


def test_pretraining_state_travels_with_the_checkpoint(data):
    model = DPRWG(knowledge=data.knowledge, **SMALL, finetune_pretrained=False)
    assert "pretrained" in model.state_dict() and not model.pretrained
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.pretrained.fill_(True)
    model.on_fit_start()  # resumed: no trainer needed, nothing re-trained


# --- the NCF stage: in the run, or a separate fit of configs/ncf.yaml --------------------------
ROOT = Path(__file__).resolve().parents[1]


def dpr_cli(command: str, config: str, root, *extra: str):
    """train.py on the tiny cohort, with the CSV logger and checkpoints under the working folder."""
    from train import make_cli

    common = [
        f"--config={ROOT / 'configs' / config}",
        f"--data.init_args.root={root}",
        "--data.init_args.batch_size=16",
    ]
    common += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    common += ["--trainer.logger.init_args.save_dir=runs"]
    if command == "fit":
        common += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    return make_cli([command, *common, *extra])


def csv_rows(cli) -> list[dict]:
    return list(csv.DictReader(open(Path(cli.trainer.logger.log_dir) / "metrics.csv")))


def test_ncf_stage_is_logged_on_its_own_axis(tiny_cohort_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cli = dpr_cli("fit", "dpr_wg.yaml", tiny_cohort_dir, "--model.init_args.pretrain_epochs=3")
    rows = csv_rows(cli)
    stage = [r for r in rows if r["ncf_pretrain/loss"]]
    assert [int(r["ncf_pretrain/epoch"]) for r in stage] == [0, 1, 2]
    assert all(r["train_loss_epoch"] == "" for r in stage)  # records of their own, not of the fit's steps
    seconds = [float(r["ncf_pretrain/seconds"]) for r in stage]
    assert 0 < seconds[0] <= seconds[1] <= seconds[2]
    said = re.search(r"NCF stage: pre-trained 3 epoch\(s\) in [0-9.]+ s, BPR ([0-9.]+) -> ([0-9.]+)", caplog.text)
    assert said, "the console does not say the NCF stage ran"
    losses = [float(r["ncf_pretrain/loss"]) for r in stage]
    assert (float(said[1]), float(said[2])) == (round(losses[0], 4), round(losses[-1], 4))
    assert any(r["train_loss_epoch"] for r in rows)  # the fit logged as before


README_NCF_FIT = "python train.py fit --config configs/ncf.yaml --checkpoint.dirpath=ckpt/ncf"
README_DPR_FROM_NCF = (
    "python train.py fit --config configs/dpr_wg.yaml --model.init_args.ncf_checkpoint=ckpt/ncf/last.ckpt"
)


def test_dpr_from_a_separate_ncf_fit_through_train_py(tiny_cohort_dir, tmp_path, monkeypatch, caplog):
    """README's two-step workflow (its options verbatim, on the tiny cohort): fit configs/ncf.yaml, then
    DPR with its checkpoint (no pre-training in DPR's run), then test and predict from DPR's checkpoint."""
    readme = (ROOT / "README.md").read_text()
    assert README_NCF_FIT in readme and README_DPR_FROM_NCF in readme, "README no longer shows the two steps"
    monkeypatch.chdir(tmp_path)
    dpr_cli("fit", "ncf.yaml", tiny_cohort_dir, README_NCF_FIT.split()[-1])
    ncf = Path("ckpt/ncf/last.ckpt")
    cli = dpr_cli("fit", "dpr_wg.yaml", tiny_cohort_dir, README_DPR_FROM_NCF.split()[-1], "--checkpoint.dirpath=dpr")
    assert f"NCF stage: weights loaded from ncf_checkpoint {ncf}" in caplog.text
    assert not any(r.get("ncf_pretrain/loss") for r in csv_rows(cli))
    trained = torch.load(ncf, weights_only=False)["state_dict"]
    dpr = torch.load(tmp_path / "dpr" / "last.ckpt", weights_only=False)["state_dict"]
    core = {k[len("core.") :]: v for k, v in trained.items() if k.startswith("core.")}
    assert core and all(torch.equal(dpr[f"ncf.{k}"], v) for k, v in core.items())  # NCF frozen in DPR
    assert not torch.equal(dpr["drugs.weight"], core["drugs.weight"])  # started from it, then fine-tuned
    tested = dpr_cli("test", "dpr_wg.yaml", tiny_cohort_dir, "--ckpt_path=dpr/last.ckpt")
    assert 0 < float(tested.trainer.callback_metrics["test_jaccard"]) <= 1
    dpr_cli("predict", "dpr_wg.yaml", tiny_cohort_dir, "--ckpt_path=dpr/last.ckpt", "--predict_output.path=recs.jsonl")
    records = [json.loads(line) for line in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert records and all(r["drugs"] for r in records)


def test_ncf_stage_figures_have_their_own_wandb_axis(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from test_sweeps_and_logging import finish_wandb, offline_run, wandb_records

    from callbacks.wandb_logging import MedRecWandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = MedRecWandbLogger(save_dir=str(tmp_path / "runs"))
    for epoch, loss in enumerate([0.7, 0.5]):
        log_stage_figures([logger], {PRETRAIN_AXIS: epoch, "ncf_pretrain/loss": loss, "ncf_pretrain/seconds": 1.0})
    logger.log_metrics({"train_loss_step": 0.3}, step=0)  # the fit's step 0 comes after the stage
    finish_wandb()
    run = offline_run(tmp_path / "runs")
    stage = [h for h in run["history"] if "ncf_pretrain/loss" in h]
    assert [(h[PRETRAIN_AXIS], h["ncf_pretrain/loss"]) for h in stage] == [(0, 0.7), (1, 0.5)]
    assert not any("trainer/global_step" in h for h in stage)
    axes = {
        r.metric.name: r.metric.step_metric
        for r in wandb_records(run["dir"])
        if r.WhichOneof("record_type") == "metric"
    }
    assert axes["ncf_pretrain/loss"] == axes["ncf_pretrain/seconds"] == PRETRAIN_AXIS


def test_a_checkpoint_loads_only_into_its_own_message_passing(data, train_batch, tmp_path):
    torch.manual_seed(0)
    model = DPRWG(knowledge=data.knowledge, message_passing="gated", **SMALL)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "gated.ckpt")
    model.eval()
    loaded = DPRWG.from_checkpoint(str(tmp_path / "gated.ckpt")).eval()
    assert loaded.hparams.message_passing == "gated"
    u = model.encoder(train_batch)
    torch.testing.assert_close(
        loaded.package_scores(u, train_batch["graphs"])[0], model.package_scores(u, train_batch["graphs"])[0]
    )
    # a model a config built with the other layers (train.py ... --ckpt_path) is told which setting loads it
    checkpoint = torch.load(tmp_path / "gated.ckpt", weights_only=False)
    with pytest.raises(ValueError, match="trained with message_passing='gated'.*message_passing=gated"):
        DPRWG(knowledge=data.knowledge, **SMALL).on_load_checkpoint(checkpoint)
    del checkpoint["hyper_parameters"]["message_passing"]
    with pytest.raises(CheckpointError, match="does not record message_passing: not a DPRWG checkpoint"):
        DPRWG(knowledge=data.knowledge, **SMALL).on_load_checkpoint(checkpoint)


def test_evaluation_chooses_one_candidate_of_similar_training_patients(data, eval_batch):
    torch.manual_seed(0)
    model = DPRWG(knowledge=data.knowledge, **SMALL).eval()
    model.refresh_pool(data.candidate_pool())
    ids, _, packages = model.candidates(eval_batch)
    assert (ids[:, 0] >= 0).all()
    probs = model.predict_probabilities(eval_batch)
    chosen = probs[eval_batch["visit_mask"]] >= 0.5
    offered = to_multi_hot(packages, data.knowledge.num_medications)
    assert (offered == chosen.unsqueeze(1)).all(-1).any(1).all()  # every choice is one of the candidates
    training = {tuple(p[p >= 0].tolist()) for p in data.candidate_pool()["packages"]}
    assert all(tuple(row.nonzero().flatten().tolist()) in training for row in chosen)


def test_ncf_top_k_and_nearest_neighbour_baselines(data, eval_batch):
    torch.manual_seed(0)
    k = data.knowledge
    top = NCF(knowledge=k, recommend="top_k", embedding_dim=16, hidden_dim=16).eval()
    chosen = top.predict_probabilities(eval_batch)[eval_batch["visit_mask"]] >= 0.5
    assert chosen.sum(1).eq(round(k.mean_package_size)).all()
    nearest = NCF(knowledge=k, recommend="nearest", embedding_dim=16, hidden_dim=16).eval()
    nearest.refresh_pool(data.candidate_pool())
    _, _, packages = nearest.candidates(eval_batch)
    chosen = nearest.predict_probabilities(eval_batch)[eval_batch["visit_mask"]] >= 0.5
    assert torch.equal(chosen, to_multi_hot(packages[:, 0], k.num_medications))


def test_text_branch_changes_the_patient_embedding(tmp_path):
    from conftest import write_cohort

    from datamodules.cohort import Cohort

    folder = write_cohort(tmp_path / "c", n_patients=12)
    cohort = Cohort.load(folder)
    cohort.visits["notes"] = [["chest", "pain"] if i % 2 else ["fever"] for i in range(len(cohort.visits))]
    cohort.save(folder)
    data = PackageGraphDataModule(root=str(folder), batch_size=4, negative_packages=2)
    model = DPRWG(knowledge=data.knowledge, **SMALL, text_dim=8)
    batch = next(iter(data.train_dataloader()))
    u = model.encoder(batch)
    assert u.shape[1] == 16 + 8
    batch["notes"] = torch.zeros_like(batch["notes"])
    assert not torch.allclose(model.encoder(batch)[:, 16:], u[:, 16:])
    assert torch.isfinite(model.training_loss(batch)["loss"])


# --- generation heuristic (§6) ---------------------------------------------------------------
def _hot(*sets, m=6):
    out = torch.zeros(1, len(sets), m, dtype=torch.bool)
    for c, drugs in enumerate(sets):
        out[0, c, list(drugs)] = True
    return out


def test_s2_drops_rare_low_ranked_drugs_and_adds_unpopular_high_ranked_ones():
    rules = GenerationRules(high=1.0, low=2.0, rare=0.5, unpopular=0.1)
    s1 = _hot({0, 1, 4}, {0, 1}, {0, 2})
    valid = torch.ones(1, 3, dtype=torch.bool)
    rank = torch.tensor([[0, 1, 5, 3, 4, 2]])  # K = 2: high = ranks 0-1, low = ranks >= 4
    popularity = torch.tensor([0.9, 0.8, 0.5, 0.5, 0.5, 0.05])  # drug 5 unpopular, rank 2
    s2 = personalise(s1, valid, rank, popularity, k=2, rules=rules)
    # drug 4: in 1/3 < 0.5 of S1 and rank 4 >= 4 -> dropped; drug 2: rare, rank 5 -> dropped
    assert s2[0, 0].nonzero().flatten().tolist() == [0, 1]
    assert s2[0, 2].nonzero().flatten().tolist() == [0]
    # unpopular drug 5 added only when high in l
    s2 = personalise(s1, valid, rank, popularity, k=3, rules=rules)
    assert s2[0, 1].nonzero().flatten().tolist() == [0, 1, 5]


def test_s3_adds_synergistic_or_co_occurring_drugs_and_drops_the_lower_of_an_antagonism():
    relation = torch.zeros(6, 6, dtype=torch.long)
    relation[0, 3] = 1  # synergy 0 -> 3 (direction ignored for adding)
    relation[1, 2] = 2  # antagonism, rarely co-occurring
    relation[0, 4] = 2  # antagonism, but often together in practice: kept
    cooc = torch.zeros(6, 6)
    cooc[5, 0] = 0.6  # drug 5 co-occurs often with drug 0
    cooc[0, 4] = cooc[4, 0] = 0.2
    rules = GenerationRules(high=2.0, frequent=0.3, seldom=0.05)
    rank = torch.tensor([[3, 0, 1, 2, 5, 4]])  # K = 2: high = ranks < 4 -> drugs 0, 1, 2, 3
    valid = torch.ones(1, 2, dtype=torch.bool)
    s1 = _hot({0, 1, 2, 4}, {1})
    s3 = mind_interactions(s1, valid, rank, relation, cooc, k=2, rules=rules)
    # + 3 (synergy with 0, high in l); 5 co-occurs with 0 but rank 4 is not high; - 2 (rank 1 > rank 0 of 1)
    assert s3[0, 0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert s3[0, 1].nonzero().flatten().tolist() == [1]
    rank = torch.tensor([[3, 0, 1, 2, 5, 0]])
    rank[0, 5] = 1
    rank[0, 2] = 4
    s3 = mind_interactions(s1, valid, rank, relation, cooc, k=2, rules=rules)
    assert 5 in s3[0, 0].nonzero().flatten().tolist()  # now high in l: added for co-occurring with 0


def test_index_list_conversions_and_personal_rank_round_trip():
    hot = _hot({0, 3}, set(), {1, 2, 5})[0]
    packages = to_index_lists(hot)
    assert packages.tolist() == [[0, 3, -1], [-1, -1, -1], [1, 2, 5]]
    assert torch.equal(to_multi_hot(packages, 6), hot)
    assert personal_rank(torch.tensor([[0.1, 0.9, 0.5]])).tolist() == [[2, 0, 1]]
    assert set_f1(_hot({0, 1})[0], _hot({1, 2})[0]).item() == pytest.approx(0.5)


def test_heuristic_predict_mode_reports_both_choices(data, tiny_cohort_dir, tmp_path):
    L.seed_everything(0)
    model = DPRWG(knowledge=data.knowledge, **SMALL, generation="heuristic")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    records = [r for batch in trainer.predict(model, datamodule=data) for r in batch]
    assert len(records) == sum(len(rows) for rows in data.split_rows("test"))
    # the paper's mode records the chosen candidate: exactly the heuristic's non-heuristic choice
    model.hparams.generation = "candidates"
    plain = [r for batch in trainer.predict(model, datamodule=data) for r in batch]
    assert [r["visit_id"] for r in plain] == [r["visit_id"] for r in records]
    assert [sorted(r["drugs"]) for r in plain] == [sorted(r["candidate_drugs"]) for r in records]
    for record in records[:20]:
        assert record["source"] in ("S1", "S2", "S3") and record["drugs"] and record["candidate_drugs"]
        assert 0 <= record["f1"] <= 1 and 0 <= record["candidate_f1"] <= 1
        assert min(record["probabilities"]) >= 0.5 and len(record["drug_names"]) == len(record["drugs"])


# --- interpretability ------------------------------------------------------------------------
def test_explanations_per_edge_and_mask_vectors(data, eval_batch):
    torch.manual_seed(0)
    packages = pad_packages([data.table.package[r] for r in eval_batch["visit_row"].tolist()])
    wg = DPRWG(knowledge=data.knowledge, **SMALL).eval()
    out = wg.explain(eval_batch, packages)
    assert out["impact"].abs().le(1).all() and len(out["impact"]) == len(out["drug_v"])
    torch.testing.assert_close(out["effective_weight"], out["impact"] * out["weight"])
    assert set(out["owner"].tolist()) <= set(range(len(packages)))
    ag = DPRAG(knowledge=data.knowledge, **SMALL).eval()
    probs = ag.explain(eval_batch, packages)["class_probabilities"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    masks = wg.mask_vectors(eval_batch)
    assert masks.shape == (len(packages), 16) and ((masks > 0) & (masks < 1)).all()

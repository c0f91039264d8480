"""DPR: drug package recommendation by interaction-aware graph induction (Zheng et al., WWW 2021).

A visit's candidate packages (those of the most similar training patients) are scored by
y = MLP([u ‖ g]), g the embedding of the package graph induced by a GNN that sees the patient
(mask layer) and the drug interactions (edge weights or attributes). Trained with BPR between
the visit's true package and sampled negative packages (Eq. 15). Two variants:

* ``DPRWG`` (§4.3.1, weighted graph): signed edge weights from R, scaled by a contextual impact
  factor; GRU-gated weighted message passing (Eq. 11–13);
* ``DPRAG`` (§4.3.2, attributed graph): edge attribute vectors masked by the patient; message /
  aggregate / update (Eq. 18–20); an auxiliary loss predicts the interaction type (Eq. 21).

The graphs of a whole batch (every visit's true and negative packages in training, every
visit's candidates in evaluation) are one torch-geometric ``Batch``; no Python loop runs over
graphs. NCF pre-training (§3) is a stage of its own before the first epoch of ``fit``
(``DPR.ncf_stage``: ``DPR.pretrain`` on the knowledge's training visits, its figures logged as
``ncf_pretrain/*``), or a separate fit of ``configs/ncf.yaml`` whose checkpoint DPR loads
(``ncf_checkpoint``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from datamodules.batches import PackageEvalBatch, PackagePairBatch, VisitDescriptions
from datamodules.errors import CheckpointError
from datamodules.options import DropoutRate, PositiveFloat, PositiveInt
from datamodules.safe_pickle import load_checkpoint
from lightning_modules.base import KNOWLEDGE_KEY
from lightning_modules.edge_gru import AttributedEdgeGRUConv, EdgeGRUNetwork
from lightning_modules.layers.dpr import AttributedGraphConv, PairLinear
from lightning_modules.ncf import NCFCore, PatientEncoder, pretrain_ncf
from lightning_modules.package_generation import (
    GenerationRules,
    heuristic_records,
    mind_interactions,
    personal_rank,
    personalise,
    set_f1,
    to_index_lists,
    to_multi_hot,
)
from lightning_modules.package_rec import PackageRecModule, bpr_package_loss, package_probabilities
from lightning_modules.sparse_aggregation import SparseGatedGraphConv

log = logging.getLogger(__name__)

__all__ = ["DPR", "DPRAG", "DPRWG", "set_f1"]

INTERACTION_CLASSES = ("none", "synergy", "antagonism")
PRETRAIN_AXIS = "ncf_pretrain/epoch"
"""The x-axis of the NCF stage's figures (``ncf_pretrain/loss``, ``ncf_pretrain/seconds``)."""


def log_stage_figures(loggers: Iterable[Logger], figures: Mapping[str, float], axis: str = PRETRAIN_AXIS) -> None:
    """Log one record of a stage that runs outside the fit's loop (the NCF stage) to every logger.

    The record carries its own x-axis value ``figures[axis]``: the stage runs before the fit's
    step 0, so the fit's ``step`` cannot index it. The CSV logger files the record under that
    value as its step (the ``axis`` column says which axis it is); W&B is told to plot the
    stage's figures against ``axis``, and the record goes without ``trainer/global_step``
    (Lightning's default x-axis of every other metric), which it does not belong to.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.define_metric(axis)
            for name in figures:
                if name != axis:
                    run.define_metric(name, step_metric=axis)  # an exact name wins over Lightning's "*"
            logger.log_metrics(dict(figures))
        else:
            logger.log_metrics(dict(figures), step=int(figures[axis]))


class DPR(PackageRecModule):
    """What DPR-WG and DPR-AG share: pre-training, encoders, readout, scoring, BPR, choice.

    Readout (Eq. 14): g = Σ_v σ(MLP_gate([h⁰_v ‖ h_v])) ⊙ MLP_value([h⁰_v ‖ h_v]); score
    y = MLP([u ‖ g]) (optionally plus (P u)ᵀ g, see ``score_head``). u's encoder and the drug
    embeddings d start from the pre-trained NCF (and are fine-tuned unless ``finetune_pretrained``
    is off); the NCF itself stays frozen and provides the similarity for candidate sets and the
    personal list of the generation heuristic.

    Args:
        embedding_dim, hidden_dim, text_dim, dropout: sizes of d / u, the MLPs, the text part of u.
        num_layers: GNN layers (message-passing steps).
        use_mask: the patient-conditioned mask layer σ(MLP(u)) (off in the AG-Mask ablation).
        pretrain_epochs, pretrain_lr, pretrain_weight_decay: the NCF stage's pre-training, before
            the first epoch of ``fit`` (0: none; NCF keeps its initial weights).
        ncf_checkpoint: a checkpoint of ``configs/ncf.yaml`` (fitted separately) to load in the NCF
            stage instead of pre-training (``pretrain_epochs`` is then unused).
        similar_negatives: extra negatives per training visit drawn from the packages of its most
            similar training patients (other patients, other packages; the same search as the
            evaluation candidates), on top of the DataModule's uniformly sampled ones. 0 = the
            paper's uniform negatives only.
        finetune_pretrained: train u's encoder and the drug embeddings further (True) or keep the
            NCF values (False).
        score_head: ``mlp`` = the paper's y = MLP([u ‖ g]); ``mlp_dot`` adds a bilinear term,
            y = MLP([u ‖ g]) + (P u)ᵀ g, as NeuMF adds its GMF part to the MLP: a one-hidden-layer
            MLP on a concatenation models the patient–package product poorly.
        message_passing: ``edge_gru`` = a GRU cell on every edge, summed at the target, then
            h_u ← MLP(W₀ h_u + M_u) (``lightning_modules.edge_gru``): DPR-WG's Eq. 11–13, its default;
            ``gated`` = messages summed first and the GRU run once per node, a gated graph network:
            DPR-AG's default (see ``DPRAG``).
        generation: ``candidates`` = choose among S1 (the paper's evaluation); ``heuristic`` =
            predict with the package-generation heuristic of §6 (S1 ∪ S2 ∪ S3; records both
            choices and their F1).
        heuristic_*: the cut-offs of ``GenerationRules``.
    """

    def __init__(
        self,
        *args,
        embedding_dim: PositiveInt = 64,
        hidden_dim: PositiveInt = 128,
        text_dim: PositiveInt = 32,
        dropout: DropoutRate = 0.2,
        num_layers: int = 2,
        use_mask: bool = True,
        pretrain_epochs: int = 40,
        pretrain_lr: PositiveFloat = 3e-3,
        pretrain_weight_decay: float = 1e-5,
        ncf_checkpoint: str | None = None,
        similar_negatives: int = 0,
        finetune_pretrained: bool = True,
        score_head: Literal["mlp", "mlp_dot"] = "mlp",
        message_passing: Literal["edge_gru", "gated"] = "edge_gru",
        generation: Literal["candidates", "heuristic"] = "candidates",
        heuristic_high: float = 1.0,
        heuristic_low: float = 2.0,
        heuristic_rare: float = 0.3,
        heuristic_unpopular: float = 0.1,
        heuristic_frequent: float = 0.3,
        heuristic_seldom: float = 0.05,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
        if score_head not in ("mlp", "mlp_dot"):
            raise ValueError(f"score_head must be 'mlp' or 'mlp_dot', got {score_head!r}")
        if message_passing not in ("edge_gru", "gated"):
            raise ValueError(f"message_passing must be 'edge_gru' or 'gated', got {message_passing!r}")
        k = self.knowledge
        self.ncf = NCFCore(
            k.document_size, k.note_size, k.num_medications, embedding_dim, hidden_dim, text_dim, dropout
        )
        self.ncf.requires_grad_(False)  # trained by pre-training only
        self.encoder = PatientEncoder(
            k.document_size, k.note_size, embedding_dim, hidden_dim, text_dim, dropout=dropout
        )
        self.drugs = nn.Embedding(k.num_medications, embedding_dim)
        # set before the optimizer and any DDP wrapper see the parameters
        self.encoder.requires_grad_(finetune_pretrained)
        self.drugs.requires_grad_(finetune_pretrained)
        self.register_buffer("pretrained", torch.tensor(False))
        u_dim, dim = self.encoder.out_dim, embedding_dim
        self.readout_gate = nn.Linear(2 * dim, dim)
        self.readout_value = nn.Linear(2 * dim, dim)
        self.score = nn.Sequential(
            nn.Linear(u_dim + dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )
        self.score_query = nn.Linear(u_dim, dim, bias=False) if score_head == "mlp_dot" else None
        self.rules = GenerationRules(
            heuristic_high, heuristic_low, heuristic_rare, heuristic_unpopular, heuristic_frequent, heuristic_seldom
        )
        self.register_buffer("popularity", torch.as_tensor(k.popularity, dtype=torch.float32), persistent=False)

    # --- subclass hook -------------------------------------------------------------------
    def graph_nodes(self, u: torch.Tensor, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(initial node states h⁰, final node states h, auxiliary losses) of every graph."""
        raise NotImplementedError  # pragma: no cover

    # --- NCF stage (§3) -----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """The NCF stage, then u's encoder and the drug embeddings start from NCF. Runs once per
        model; a resumed fit finds it done (``pretrained``)."""
        if bool(self.pretrained):  # resumed from a checkpoint of this model
            return
        self.ncf_stage()
        self.initialise_from_ncf()
        self.pretrained.fill_(True)

    def ncf_stage(self) -> None:
        """NCF's weights for this fit: loaded from ``ncf_checkpoint`` (a separate fit of
        ``configs/ncf.yaml``), else pre-trained here for ``pretrain_epochs`` (``pretrain``).

        The stage's figures go to the trainer's loggers under ``ncf_pretrain/``: ``loss`` (mean
        BPR of each epoch) and ``seconds`` (since the stage began; the last is its duration),
        against their own axis ``ncf_pretrain/epoch`` (``log_stage_figures``); one line on the
        console says which of the two ways NCF came.
        """
        hp = self.hparams
        if hp.ncf_checkpoint:
            self.load_ncf(hp.ncf_checkpoint)
            rank_zero_info(
                f"medrec: NCF stage: weights loaded from ncf_checkpoint {hp.ncf_checkpoint} "
                "(pretrain_epochs unused; no pre-training in this run)"
            )
            return
        if hp.pretrain_epochs == 0:
            rank_zero_info("medrec: NCF stage: skipped (pretrain_epochs=0, no ncf_checkpoint): NCF stays untrained")
            return
        start = time.perf_counter()

        def log_epoch(epoch: int, loss: float) -> None:
            seconds = time.perf_counter() - start
            log_stage_figures(
                self.loggers, {PRETRAIN_AXIS: epoch, "ncf_pretrain/loss": loss, "ncf_pretrain/seconds": seconds}
            )

        history = self.pretrain(on_epoch=log_epoch)
        rank_zero_info(
            f"medrec: NCF stage: pre-trained {len(history)} epoch(s) in {time.perf_counter() - start:.1f} s, "
            f"BPR {history[0]:.4f} -> {history[-1]:.4f} (logged as ncf_pretrain/*)"
        )
        if self.trainer.world_size > 1:
            # Every rank pre-trained on the whole training split. DDP synchronises weights
            # only when it wraps the model, before this, so rank 0's result is sent to all:
            # nondeterministic kernels (GPU) must not start the ranks from different weights.
            state = {k: v.cpu() for k, v in self.ncf.state_dict().items()}
            self.ncf.load_state_dict(self.trainer.strategy.broadcast(state, src=0))

    def pretrain(self, fast: bool | None = None, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
        """NCF pre-training (§3) of ``self.ncf`` on this process, over the knowledge's training
        visits (``PackageKnowledge.training_visits``, batched and shuffled as the DataModule
        does); the mean BPR of each epoch. ``fast``: one batch of one epoch (default: the
        trainer's ``fast_dev_run``); ``on_epoch(epoch, loss)``: called after each epoch."""
        hp = self.hparams
        if fast is None:
            fast = self._trainer is not None and bool(self.trainer.fast_dev_run)
        return pretrain_ncf(
            self.ncf,
            self.knowledge.training_visits.loader(self.num_medications),
            epochs=1 if fast else hp.pretrain_epochs,
            lr=hp.pretrain_lr,
            weight_decay=hp.pretrain_weight_decay,
            device=self.device,
            max_batches=1 if fast else None,
            on_epoch=on_epoch,
        )

    def on_train_start(self) -> None:
        if self.hparams.similar_negatives > 0:
            self.refresh_pool()  # the frozen NCF's embeddings: fixed for the whole fit

    def load_ncf(self, path: str) -> None:
        checkpoint = load_checkpoint(path, map_location=self.device)  # weights_only: no code runs
        if KNOWLEDGE_KEY not in checkpoint:
            raise CheckpointError(f"ncf_checkpoint {path}: not a medrec checkpoint (no {KNOWLEDGE_KEY})")
        # the data's own knowledge class: DPR's disease-document vocabulary is compared too
        self.knowledge.check_compatible(type(self.knowledge).from_state(checkpoint[KNOWLEDGE_KEY]), what=path)
        state = {k[len("core.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("core.")}
        if not state:
            raise CheckpointError(f"ncf_checkpoint {path}: not an NCF checkpoint (no core.* weights)")
        self.ncf.load_state_dict(state)

    # settings that change the parameters' shapes or meaning: a checkpoint loads only into their values
    ARCHITECTURE_SETTINGS = ("message_passing",)
    EVALUATION_SETTINGS = (
        *PackageRecModule.EVALUATION_SETTINGS,
        "generation",
        *(f"heuristic_{k}" for k in ("high", "low", "rare", "unpopular", "frequent", "seldom")),
    )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        written = checkpoint.get("hyper_parameters") or {}
        for name in self.ARCHITECTURE_SETTINGS:
            if name not in written:
                raise CheckpointError(f"the checkpoint does not record {name}: not a {type(self).__name__} checkpoint")
            saved = written[name]
            if saved != self.hparams[name]:
                raise ValueError(
                    f"the checkpoint was trained with {name}={saved!r}, this model has "
                    f"{self.hparams[name]!r}: build it with --model.init_args.{name}={saved} "
                    f"(or from_checkpoint(path, {name}={saved!r}))"
                )

    def initialise_from_ncf(self) -> None:
        self.encoder.load_state_dict(self.ncf.encoder.state_dict())
        with torch.no_grad():
            self.drugs.weight.copy_(self.ncf.drugs.weight)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- scoring -----------------------------------------------------------------------------
    def patient_mask(self, u: torch.Tensor) -> torch.Tensor:
        """σ(MLP(u)), the mask layer, per patient."""
        return torch.sigmoid(self.mask(u))

    def masked_drugs(self, u: torch.Tensor, graphs: Batch) -> torch.Tensor:
        """d̂_v = σ(MLP(u)) ⊙ d_v on every node, u its graph's patient (d_v with the mask layer off)."""
        d = self.drugs(graphs.x)
        if not self.hparams.use_mask:
            return d
        return self.patient_mask(u)[graphs.owner[graphs.batch]] * d

    def retrieval_embedding(self, batch: VisitDescriptions) -> torch.Tensor:
        return self.ncf.encoder(batch)

    def readout(self, h0: torch.Tensor, h: torch.Tensor, graphs: Batch) -> torch.Tensor:
        """Eq. 14, summed per graph: (G, dim)."""
        z = torch.cat([h0, h], dim=-1)
        gated = torch.sigmoid(self.readout_gate(z)) * self.readout_value(z)
        return scatter(gated, graphs.batch, dim=0, dim_size=graphs.num_graphs, reduce="sum")

    def package_scores(self, u: torch.Tensor, graphs: Batch) -> tuple[torch.Tensor, dict]:
        """y = MLP([u ‖ g]) of every graph (G,), for its owner's u; plus auxiliary losses."""
        h0, h, aux = self.graph_nodes(u, graphs)
        g = self.readout(h0, h, graphs)
        u = u[graphs.owner]
        y = self.score(torch.cat([u, g], dim=-1)).squeeze(-1)
        if self.score_query is not None:
            y = y + (self.score_query(u) * g).sum(-1)
        return y, aux

    def training_loss(self, batch: PackagePairBatch) -> dict[str, torch.Tensor]:
        graphs = batch.get("graphs")
        if graphs is None:
            raise ValueError("DPR trains on negative packages: set data.init_args.negative_packages >= 1")
        u = self.encoder(batch)
        y, aux = self.package_scores(u, graphs)
        y = y.view(len(u), -1)
        negatives = y[:, 1:]
        if self.hparams.similar_negatives > 0:
            negatives = torch.cat([negatives, self.score_candidates(batch, self.similar_negatives(batch), u)], 1)
        losses = {"bpr": bpr_package_loss(y[:, 0], negatives), **aux}
        losses["loss"] = sum(losses.values())
        return losses

    def similar_negatives(self, batch: VisitDescriptions) -> torch.Tensor:
        """(N, h, L) packages of similar other training patients, h drawn at random among them."""
        ids, _, packages = self.candidates(batch)
        usable = (ids >= 0) & (ids != batch["package_id"].unsqueeze(1))
        order = torch.rand(ids.shape, device=ids.device).masked_fill(~usable, 2.0).argsort(1)
        pick = order[:, : self.hparams.similar_negatives]
        packages = packages.gather(1, pick.unsqueeze(-1).expand(-1, -1, packages.shape[-1]))
        return packages.masked_fill(~usable.gather(1, pick).unsqueeze(-1), -1)

    def score_candidates(
        self, batch: VisitDescriptions, packages: torch.Tensor, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C, L) candidate packages (-1 rows = none) -> (N, C) scores, -inf where none."""
        valid = packages[..., 0] >= 0
        scores = torch.full(valid.shape, float("-inf"), device=packages.device)
        if not valid.any():
            return scores
        graphs = self.graph_builder.build(packages[valid])
        graphs.owner = valid.nonzero()[:, 0]
        u = self.encoder(batch) if u is None else u
        scores[valid] = self.package_scores(u, graphs)[0].to(scores.dtype)
        return scores

    def visit_probabilities(self, batch: PackageEvalBatch) -> torch.Tensor:
        _, _, packages = self.candidates(batch)
        scores = self.score_candidates(batch, packages)
        return package_probabilities(packages, scores, scores.argmax(1), self.num_medications)

    # --- package generation heuristic (§6) ----------------------------------------------
    def generate(self, batch: PackageEvalBatch) -> dict[str, torch.Tensor]:
        """S1, S2, S3 of every visit scored together.

        Returns ``packages`` (N, 3C, L) (S1 at [0, C), S2 at [C, 2C), S3 at [2C, 3C); -1 rows
        where a candidate is missing or empty), ``scores`` (N, 3C), ``candidate_choice`` (best of
        S1, the non-heuristic choice) and ``heuristic_choice`` (best of all).
        """
        _, _, s1_packages = self.candidates(batch)
        num_candidates = s1_packages.shape[1]
        valid = s1_packages[..., 0] >= 0
        s1 = to_multi_hot(s1_packages, self.num_medications) & valid.unsqueeze(-1)
        rank = personal_rank(self.ncf.scores(batch))
        k = self.knowledge.mean_package_size
        s2 = personalise(s1, valid, rank, self.popularity, k, self.rules)
        s3 = mind_interactions(
            s1, valid, rank, self.graph_builder.relation, self.graph_builder.cooccurrence, k, self.rules
        )
        hot = torch.cat([s1, s2, s3], dim=1)
        packages = to_index_lists(hot)
        packages = packages.masked_fill(~hot.any(-1, keepdim=True), -1)
        scores = self.score_candidates(batch, packages)
        return {
            "packages": packages,
            "scores": scores,
            "candidate_choice": scores[:, :num_candidates].argmax(1),
            "heuristic_choice": scores.argmax(1),
        }

    def predict_step(self, batch: PackageEvalBatch, batch_idx: int) -> list[dict]:
        """Base records; with ``generation: heuristic`` the heuristic choice, plus for comparison
        the non-heuristic choice (``candidate_drugs``), each one's F1 against the visit's true
        package and where the heuristic choice came from (``source`` S1/S2/S3)."""
        if self.hparams.generation != "heuristic":
            return super().predict_step(batch, batch_idx)
        return heuristic_records(batch, self.generate(batch), self.knowledge)

    # --- interpretability ------------------------------------------------------------------
    @torch.no_grad()
    def mask_vectors(self, batch: VisitDescriptions) -> torch.Tensor:
        """σ(MLP(u)) of every visit (Fig. 8)."""
        return self.patient_mask(self.encoder(batch))

    @torch.no_grad()
    def explain(self, batch: VisitDescriptions, packages: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-edge figures of each visit's package (N, L): owner, drugs, R, p, and the variant's own."""
        graphs = self.graph_builder.build(packages)
        graphs.owner = torch.arange(len(packages), device=packages.device)
        u = self.encoder(batch)
        src, dst = graphs.edge_index
        out = {
            "owner": graphs.owner[graphs.batch[src]],
            "drug_v": graphs.x[src],
            "drug_u": graphs.x[dst],
            "relation": graphs.relation,
            "cooccurrence": graphs.cooccurrence,
        }
        out.update(self.edge_details(u, graphs))
        out["score"] = self.package_scores(u, graphs)[0]
        return out

    def edge_details(self, u: torch.Tensor, graphs: Batch) -> dict[str, torch.Tensor]:
        return {}


class DPRWG(DPR):
    """DPR on the weighted graph (§4.3.1).

    Edge weight e_vu = 1 for synergism, -1 for antagonism, p_vu otherwise; node states start
    from the masked drug embeddings d̂_v = σ(MLP(u)) ⊙ d_v; the contextual impact factor
    c_vu = tanh(aᵀ MLP([d̂_u ‖ d̂_v])) rescales every edge, ê_vu = c_vu · e_vu; ``num_layers``
    layers of Eq. 11–13 propagate them: M_u = Σ_v GRU(ê_vu W₁ h_v, h_u), h_u ← MLP(W₀ h_u + M_u)
    (``EdgeGRUConv``; with ``message_passing: gated``, GatedGraphConv's m_u = Σ_v ê_vu W h_v,
    h_u ← GRU(m_u, h_u), the sum taken as a sparse product: ``SparseGatedGraphConv``).

    Args:
        edge_weights: ``typed`` (the paper), ``cooccurrence`` (p_vu only, the WG-Type ablation),
            ``structure`` (1 on every edge; with use_context/use_mask off, the "GNN" baseline).
        use_context: the contextual impact factor (off in the WG-Context ablation).
    """

    def __init__(
        self,
        *args,
        edge_weights: Literal["typed", "cooccurrence", "structure"] = "typed",
        use_context: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        hp = self.hparams
        dim = hp.embedding_dim
        self.mask = nn.Linear(self.encoder.out_dim, dim)
        self.context = PairLinear(dim, dim)  # first layer of MLP([d̂_u ‖ d̂_v])
        self.context_out = nn.Linear(dim, 1, bias=False)  # a
        if hp.message_passing == "edge_gru":
            self.gnn = EdgeGRUNetwork(dim, hp.num_layers)
        else:
            self.gnn = SparseGatedGraphConv(dim, hp.num_layers, aggr="add")

    def edge_weight(self, graphs: Batch) -> torch.Tensor:
        mode = self.hparams.edge_weights
        p = graphs.cooccurrence
        if mode == "structure":
            return torch.ones_like(p)
        if mode == "cooccurrence":
            return p
        return torch.where(graphs.relation == 1, 1.0, torch.where(graphs.relation == 2, -1.0, p))

    def impact(self, h0: torch.Tensor, graphs: Batch) -> torch.Tensor:
        src, dst = graphs.edge_index  # edge v -> u: v = src, u = dst
        return torch.tanh(self.context_out(torch.relu(self.context(h0, dst, src)))).squeeze(-1)

    def graph_nodes(self, u: torch.Tensor, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        h0 = self.masked_drugs(u, graphs)
        weight = self.edge_weight(graphs).to(h0.dtype)
        if self.hparams.use_context:
            weight = self.impact(h0, graphs) * weight
        return h0, self.gnn(h0, graphs.edge_index, weight), {}

    def edge_details(self, u: torch.Tensor, graphs: Batch) -> dict[str, torch.Tensor]:
        h0 = self.masked_drugs(u, graphs)
        weight = self.edge_weight(graphs)
        impact = self.impact(h0, graphs) if self.hparams.use_context else torch.ones_like(weight)
        return {"weight": weight, "impact": impact, "effective_weight": impact * weight}


class DPRAG(DPR):
    """DPR on the attributed graph (§4.3.2).

    The patient's mask layer multiplies the edge attribute vectors, ê_vu = σ(MLP(u)) ⊙ MLP([d_v ‖ d_u]),
    and the node states start from d_v (``mask_layer: edge``, the default). ``mask_layer: drug`` is
    DPR-WG's mask layer instead, on the drug embeddings, d̂_v = σ(MLP(u)) ⊙ d_v: the node states
    start from d̂ and the attributes are built from it, ê_vu = MLP([d̂_v ‖ d̂_u]) (the abstract names
    one mask layer for the framework, the variants differing in how they describe the interactions).
    How the two compare on the synthetic cohort and MIMIC-III: docs/dpr.md.
    ``num_layers`` layers of Eq. 18–20 as message / aggregate / update: m_vu = MLP([h_v ‖ ê_vu]),
    a_u = Σ_v m_vu, h_u ← GRU(a_u, h_u) (``AttributedGraphConv``, ``message_passing: gated``); or,
    in DPR-WG's per-edge form, M_u = Σ_v GRU(MLP([h_v ‖ ê_vu]), h_u), h_u ← MLP(W₀ h_u + M_u)
    (``AttributedEdgeGRUConv``, ``edge_gru``). The paper's Eq. 18–20 are not transcribed anywhere
    within reach, so the default is the form that measured better on MIMIC-III (docs/dpr.md).
    loss = BPR + type_weight · cross-entropy of softmax(ê_vuᵀ Q) against R_vu on the edges whose
    relation is known (none / synergy / antagonism; unknown-kind edges carry no label) (Eq. 21).

    Args:
        edge_dim: size of the edge attributes.
        type_weight: weight of the interaction-type loss (0 in the AG-Type ablation).
        mask_layer: ``edge`` (default) or ``drug``: what the patient's mask multiplies, as above.
        message_passing: ``gated`` (default) or ``edge_gru``, as above.
    """

    ARCHITECTURE_SETTINGS = (*DPR.ARCHITECTURE_SETTINGS, "mask_layer")

    def __init__(
        self,
        *args,
        edge_dim: PositiveInt = 32,
        type_weight: float = 1.0,
        mask_layer: Literal["edge", "drug"] = "edge",
        message_passing: Literal["edge_gru", "gated"] = "gated",
        **kwargs,
    ):
        if mask_layer not in ("edge", "drug"):
            raise ValueError(f"mask_layer must be 'edge' or 'drug', got {mask_layer!r}")
        super().__init__(*args, message_passing=message_passing, **kwargs)
        hp = self.hparams
        dim = hp.embedding_dim
        self.edge_in = PairLinear(dim, edge_dim)  # first layer of MLP([d_v ‖ d_u])
        self.edge_out = nn.Sequential(nn.ReLU(), nn.Linear(edge_dim, edge_dim))
        self.mask = nn.Linear(self.encoder.out_dim, edge_dim if mask_layer == "edge" else dim)
        layer = AttributedEdgeGRUConv if hp.message_passing == "edge_gru" else AttributedGraphConv
        self.layers = nn.ModuleList(layer(dim, edge_dim) for _ in range(hp.num_layers))
        self.types = nn.Linear(edge_dim, len(INTERACTION_CLASSES), bias=False)  # Q

    def node_inputs(self, u: torch.Tensor, graphs: Batch) -> torch.Tensor:
        """h⁰: d̂_v with ``mask_layer: drug``, d_v with ``edge``."""
        return self.masked_drugs(u, graphs) if self.hparams.mask_layer == "drug" else self.drugs(graphs.x)

    def edge_attributes(self, u: torch.Tensor, graphs: Batch, d: torch.Tensor) -> torch.Tensor:
        """ê of every edge from the node inputs ``d``."""
        src, dst = graphs.edge_index
        e = self.edge_out(self.edge_in(d, src, dst))
        if self.hparams.use_mask and self.hparams.mask_layer == "edge":
            e = self.patient_mask(u)[graphs.owner[graphs.batch[src]]] * e
        return e

    def graph_nodes(self, u: torch.Tensor, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        d = self.node_inputs(u, graphs)
        e = self.edge_attributes(u, graphs, d)
        h = d
        for layer in self.layers:
            h = layer(h, graphs.edge_index, e)
        aux = {}
        if self.training and self.hparams.type_weight > 0:
            labelled = graphs.relation >= 0
            if labelled.any():
                aux["type"] = self.hparams.type_weight * F.cross_entropy(
                    self.types(e[labelled]), graphs.relation[labelled]
                )
        return d, h, aux

    def edge_details(self, u: torch.Tensor, graphs: Batch) -> dict[str, torch.Tensor]:
        e = self.edge_attributes(u, graphs, self.node_inputs(u, graphs))
        return {"class_probabilities": self.types(e).softmax(-1)}

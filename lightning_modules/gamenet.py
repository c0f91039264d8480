"""GAMENet (Shang et al., AAAI 2019): graph-augmented memory networks for drug combinations."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import add_remaining_self_loops, dense_to_sparse, scatter, to_dense_adj

from datamodules.batches import VisitBatch
from datamodules.options import DropoutRate, PositiveInt
from lightning_modules.base import MedRecModule
from lightning_modules.ddi_loss import ddi_loss
from lightning_modules.metrics import batch_pair_counts
from lightning_modules.required_knowledge import require_ddi_pairs

Normalization = Literal["row", "symmetric"]


def normalized_adjacency(adj: np.ndarray | torch.Tensor, normalization: Normalization = "row") -> torch.Tensor:
    """Dense (M, M) Â = A + I normalised for a GCN, built with torch-geometric's graph utilities.

    ``row``: D̂⁻¹Â, every node averages itself and its neighbours (the authors' code);
    ``symmetric``: D̂^-½ Â D̂^-½ (Kipf & Welling). Row i holds the weights node i aggregates
    with, so ``Â @ X`` is one propagation step. The adjacency is symmetrised first.
    """
    adj = torch.as_tensor(np.asarray(adj), dtype=torch.float32)
    n = adj.shape[0]
    adj = ((adj != 0) | (adj.T != 0)).float().fill_diagonal_(0.0)
    edge_index, _ = dense_to_sparse(adj)
    if normalization == "symmetric":
        edge_index, weight = gcn_norm(edge_index, None, n, add_self_loops=True)
    elif normalization == "row":
        edge_index, weight = add_remaining_self_loops(edge_index, torch.ones(edge_index.shape[1]), 1.0, n)
        weight = weight / scatter(weight, edge_index[1], dim=0, dim_size=n, reduce="sum")[edge_index[1]]
    else:
        raise ValueError(f"normalization must be 'row' or 'symmetric', got {normalization!r}")
    # torch-geometric edges run source -> target; the target aggregates, so it indexes the row
    return to_dense_adj(edge_index.flip(0), edge_attr=weight, max_num_nodes=n)[0]


class DrugGraphEncoder(nn.Module):
    """Two-layer GCN over a drug graph with one-hot node features (GAMENet Eq. 4).

    Z = Â · dropout(ReLU(Â · I · W₁ + b₁)) · W₂ + b₂, with Â from :func:`normalized_adjacency`;
    the identity input makes W₁ a learnable drug embedding. The drug graphs are small (M ≈ 100
    nodes, ~10⁴ edges), where a dense Â product is over ten times faster on CPU than message
    passing over an edge list, so the propagation is a matrix product.
    """

    def __init__(self, adj, dim: int, dropout: DropoutRate = 0.3, normalization: Normalization = "row"):
        super().__init__()
        n = int(np.asarray(adj).shape[0])
        self.register_buffer("adjacency", normalized_adjacency(adj, normalization), persistent=False)
        self.weight1 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n, dim)))
        self.bias1 = nn.Parameter(torch.zeros(dim))
        self.weight2 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, dim)))
        self.bias2 = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        hidden = F.relu(self.adjacency @ self.weight1 + self.bias1)  # Â·I·W₁ = Â·W₁
        return self.adjacency @ (self.dropout(hidden) @ self.weight2) + self.bias2  # (M, dim)


class GAMENet(MedRecModule):
    """Graph Augmented MEmory Networks, batched over patients and visits.

    For visit t of a patient with diagnosis / procedure codes c_d^t, c_p^t:

    * e_d^t, e_p^t = pooled code embeddings, dropout ``dropout`` on each code (Eq. 1; the
      authors' code averages, ``pooling: sum`` gives the paper's W·c);
    * h_d^t = GRU_d(e_d^1..t), h_p^t = GRU_p(e_p^1..t) (dual RNN, Eq. 2);
    * q^t = W_q ReLU([h_d^t, h_p^t]) (query, Eq. 3);
    * memory bank M_b = Z_ehr − β·Z_ddi, Z = two-layer GCN over the training-split
      co-prescription graph and the DDI graph, β learnable (Eqs. 4–5); ``ddi_in_memory: false``
      drops the DDI term (the paper's "GAMENet w/o DDI");
    * dynamic memory: keys q^1..q^{t-1}, values the multi-hot drug sets of those visits (Eq. 6);
    * o_b^t = M_bᵀ softmax(M_b q^t) (fact 1), o_d^t = M_bᵀ Vᵀ softmax(K q^t) (fact 2; equal to
      fact 1 at a patient's first visit) (Eq. 7);
    * logits^t = MLP(ReLU([q^t, o_b^t, o_d^t])) (Eq. 8).

    The whole batch is one pass: both GRUs run over the padded (B, T) sequences (padding sits
    after the last visit, so it never reaches a real one) and the dynamic memory is a (B, T, T)
    attention whose mask only admits strictly earlier visits of the same patient.

    Loss: ``(1 − margin_weight)·BCE + margin_weight·multilabel margin`` (the paper's mixture π);
    the DDI loss (:func:`lightning_modules.ddi_loss.ddi_loss`, averaged over the M² drug pairs as
    in the authors' code, times ``ddi_loss_weight``) replaces it on the steps a
    :class:`callbacks.DDIAnnealing` callback chooses. Without that callback the DDI loss is only
    logged. With it, a cohort without any adverse DDI pair is refused (the switch would have
    nothing to act on) unless ``allow_no_ddi``.

    Args:
        embedding_dim: width d of code embeddings, queries and the memory bank (paper 64).
        dropout: dropout on code embeddings (paper 0.4).
        gcn_dropout: dropout between the two GCN layers (authors' code 0.3).
        ddi_in_memory: subtract the DDI-graph embedding from the memory bank.
        normalization: adjacency normalisation of the GCNs, ``row`` (authors' code) or
            ``symmetric``.
        pooling: ``mean`` or ``sum`` of a visit's code embeddings.
        margin_weight: share π of the multilabel margin loss in the prediction loss (0.1).
        ddi_loss_weight: multiplier of the DDI loss, which is averaged over the M² drug pairs as
            in the authors' code (1.0 = their scale).
        allow_no_ddi: accept a fit with the DDI-loss switch on a cohort without adverse DDI pairs.
        Other arguments (lr, threshold, bootstrap...) as in :class:`MedRecModule`.
    """

    def __init__(
        self,
        *args,
        embedding_dim: PositiveInt = 64,
        dropout: DropoutRate = 0.4,
        gcn_dropout: DropoutRate = 0.3,
        ddi_in_memory: bool = True,
        normalization: Normalization = "row",
        pooling: Literal["mean", "sum"] = "mean",
        margin_weight: float = 0.1,
        ddi_loss_weight: float = 1.0,
        allow_no_ddi: bool = False,
        **kwargs,
    ):
        super().__init__(*args, margin_weight=margin_weight, **kwargs)
        if pooling not in ("mean", "sum"):
            raise ValueError(f"pooling must be 'mean' or 'sum', got {pooling!r}")
        if ddi_loss_weight < 0:
            raise ValueError(f"ddi_loss_weight must be >= 0, got {ddi_loss_weight}")
        k, d = self.knowledge, embedding_dim
        self.ddi_switch = None  # set by callbacks.DDIAnnealing during fit
        self.diag_embedding = nn.Embedding(k.num_diagnoses, d)
        self.proc_embedding = nn.Embedding(k.num_procedures, d)
        self.dropout = nn.Dropout(dropout)
        self.diag_rnn = nn.GRU(d, 2 * d, batch_first=True)
        self.proc_rnn = nn.GRU(d, 2 * d, batch_first=True)
        self.query = nn.Sequential(nn.ReLU(), nn.Linear(4 * d, d))
        self.ehr_gcn = DrugGraphEncoder(k.ehr_adj, d, gcn_dropout, normalization)
        if ddi_in_memory:
            self.ddi_gcn = DrugGraphEncoder(k.ddi_adj, d, gcn_dropout, normalization)
            self.beta = nn.Parameter(torch.empty(1).uniform_(-0.1, 0.1))
        self.output = nn.Sequential(nn.ReLU(), nn.Linear(3 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, k.num_medications))
        # Unit-scale code embeddings and He-initialised ReLU layers keep the visit signal alive
        # from the first step. With the authors' initialisation (embeddings U(±0.1), PyTorch
        # defaults elsewhere) the batched model, which takes ~40x fewer optimizer steps than the
        # per-visit reference, spends its first epochs on drug frequencies alone.
        for embedding in (self.diag_embedding, self.proc_embedding):
            nn.init.uniform_(embedding.weight, -1.0, 1.0)
        for layer in (*self.query, *self.output):
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    # --- model ---------------------------------------------------------------------------
    def _visit_embeddings(self, embedding: nn.Embedding, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, L) codes -> (B, T, d) pooled embeddings, dropout applied to every real code."""
        batch, steps = codes.shape[:2]
        mask = mask.bool()
        # Gather only the real codes: the padded (B, T, L, d) block is mostly padding when one
        # patient in the batch has many visits, and dropout's random mask is the dominant cost.
        visit = mask.nonzero()[:, :2]
        vectors = self.dropout(embedding(codes[mask]))
        flat = vectors.new_zeros(batch * steps, vectors.shape[-1])
        total = flat.index_add(0, visit[:, 0] * steps + visit[:, 1], vectors).view(batch, steps, -1)
        if self.hparams.pooling == "mean":
            total = total / mask.sum(-1, keepdim=True).clamp(min=1).to(total.dtype)
        return total

    def memory_bank(self) -> torch.Tensor:
        """M_b (M, d): EHR-graph embedding minus β times the DDI-graph embedding (Eq. 5)."""
        bank = self.ehr_gcn()
        if self.hparams.ddi_in_memory:
            bank = bank - self.beta * self.ddi_gcn()
        return bank

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        diag = self._visit_embeddings(self.diag_embedding, batch["diagnoses"], batch["diagnoses_mask"])
        proc = self._visit_embeddings(self.proc_embedding, batch["procedures"], batch["procedures_mask"])
        h_diag, _ = self.diag_rnn(diag)
        h_proc, _ = self.proc_rnn(proc)
        query = self.query(torch.cat([h_diag, h_proc], dim=-1))  # (B, T, d)
        bank = self.memory_bank()  # (M, d)

        fact1 = torch.softmax(query @ bank.T, dim=-1) @ bank  # (B, T, d)

        steps = torch.arange(query.shape[1], device=query.device)
        earlier = steps[None, :] < steps[:, None]  # (T, T): key j strictly before query t
        scores = (query @ query.transpose(1, 2)).masked_fill(~earlier, torch.finfo(query.dtype).min)
        history = torch.softmax(scores, dim=-1) @ batch["medications"].to(query.dtype)  # (B, T, M)
        fact2 = history @ bank
        fact2 = torch.where((steps > 0)[None, :, None], fact2, fact1)  # no history at visit 0

        return self.output(torch.cat([query, fact1, fact2], dim=-1))

    # --- training ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.ddi_switch is not None:
            require_ddi_pairs(self.knowledge, "GAMENet's DDI-loss switch", self.hparams.allow_no_ddi)

    def compute_loss(self, logits: torch.Tensor, batch: VisitBatch) -> dict[str, torch.Tensor]:
        """Prediction loss under ``loss`` plus the DDI loss (mean over visits and M² pairs) under ``ddi``."""
        out = super().compute_loss(logits, batch)
        probs = torch.sigmoid(logits.float())
        scale = self.hparams.ddi_loss_weight / self.num_medications**2
        out["ddi"] = scale * ddi_loss(probs, self.ddi_adj, batch["visit_mask"])
        return out

    def training_step(self, batch: VisitBatch, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        losses = self.compute_loss(logits, batch)
        if self.ddi_switch is not None:
            ddi_pairs, all_pairs = batch_pair_counts(
                torch.sigmoid(logits.detach().float()), batch["visit_mask"], self.ddi_adj, self.hparams.threshold
            )
            use_ddi = self.ddi_switch.choose(ddi_pairs, all_pairs)
            losses["ddi_switch"] = logits.new_tensor(float(use_ddi))
            if use_ddi:
                losses["loss"] = losses["ddi"]
        size = len(batch["lengths"])
        self.log_train_losses(losses, batch_size=size)
        return losses["loss"]

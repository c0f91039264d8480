"""SafeDrug (Yang et al., IJCAI 2021): dual molecular graph encoders with a controllable DDI loss.

Equation numbers refer to the paper (arXiv 2105.02711). Where the paper is silent the
authors' reference code settles the detail; deliberate departures are listed in the class
docstring.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing, global_add_pool, global_mean_pool
from torch_geometric.utils import scatter, spmm, to_torch_csr_tensor

from datamodules.batches import VisitBatch
from datamodules.molecules import molecule_coverage, molecule_graphs, require_molecules, substructure_mask
from datamodules.options import DropoutRate, PositiveInt
from lightning_modules.base import MedRecModule
from lightning_modules.ddi_loss import ddi_loss
from lightning_modules.metrics import batch_pair_counts
from lightning_modules.precision import float32
from lightning_modules.required_knowledge import require_ddi_pairs
from lightning_modules.visit_ops import causal_gru, margin_targets

log = logging.getLogger(__name__)


class MPNNLayer(MessagePassing):
    """One message-passing round of SafeDrug's molecule encoder (paper Sec. 3.3, "global").

    h'_i = ReLU(W h_i + b), then h_i <- h'_i + Σ_{j ∈ N(i)} h'_j: the message from a bonded
    neighbour is its transformed state and the update adds the summed messages to the atom's
    own (the reference code's ``update``, written as torch-geometric message passing).
    ``adjacency`` may be an edge index (2, E) or a sparse (N, N) tensor, which takes the fused
    sparse-matrix product path.
    """

    def __init__(self, dim: int):
        super().__init__(aggr="add")
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor, transformed: bool = False) -> torch.Tensor:
        hidden = x if transformed else torch.relu(self.linear(x))
        return hidden + self.propagate(adjacency, x=hidden)

    def message_and_aggregate(self, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # sparse products have no bfloat16 kernel on the CPU: aggregate in the adjacency's float32
        with float32(x):
            return spmm(adj_t, x.to(adj_t.dtype), reduce="sum").to(x.dtype)


class MoleculeEncoder(nn.Module):
    """MPNN over atom graphs -> one vector per molecule (learned fingerprint embeddings, L layers).

    Input atoms carry Weisfeiler-Lehman fingerprint ids (``datamodules.molecules``); the
    readout over a molecule's atoms is the mean (``readout="mean"``, the paper) or the sum (the
    reference code). The first layer's ReLU(W e + b) depends on the fingerprint only, so it is
    computed once per fingerprint and then gathered per atom (same result, ~8x fewer rows).
    """

    def __init__(self, num_fingerprints: int, dim: int, layers: int = 2, readout: Literal["mean", "sum"] = "mean"):
        super().__init__()
        if readout not in ("mean", "sum"):
            raise ValueError(f"readout must be 'mean' or 'sum', got {readout!r}")
        if layers < 1:
            raise ValueError(f"the MPNN needs at least 1 layer, got {layers}")
        self.embedding = nn.Embedding(max(1, num_fingerprints), dim)
        self.layers = nn.ModuleList(MPNNLayer(dim) for _ in range(layers))
        self.pool = global_mean_pool if readout == "mean" else global_add_pool

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor, atom_molecule: torch.Tensor, num_molecules: int):
        first = self.layers[0]
        h = first(torch.relu(first.linear(self.embedding.weight))[x], adjacency, transformed=True)
        for layer in self.layers[1:]:
            h = layer(h, adjacency)
        return self.pool(h, atom_molecule, size=num_molecules)


class SafeDrug(MedRecModule):
    """SafeDrug: GRU patient query, global MPNN encoder, local BRICS-masked encoder, DDI-controlled loss.

    Patient query (paper Sec. 3.2): each visit's diagnoses and procedures are summed embeddings
    (dropout on the code embeddings), two GRUs run over the visit sequence and
    q_t = W [h^d_t ; h^p_t] after a ReLU. The GRUs are causal, so every visit of every patient is
    predicted in one pass (the batch is packed; no loop over visits).

    Global encoder: an MPNN (``MoleculeEncoder``) embeds every molecule of the vocabulary, a
    drug's memory row E_g[i] is the mean of its molecules' vectors; m_g = σ(E_g q) (Eq. 10) and
    m_g' = LayerNorm(m_g + W_g m_g + b_g) (Eq. 11). The MPNN runs once per forward over all
    molecules, batched with torch-geometric, and is trained with the rest (the reference code
    computes E_g once with untrained weights).

    Local encoder: BRICS fragments of the molecules form a substructure vocabulary and the
    0/1 drug x substructure mask H; m_l = σ(W_f q + b_f) is the functional vector over
    substructures and m_l' = (W ⊙ H) m_l the local drug vector (masked linear layer, no bias).

    Output: logits = m_g' ⊙ m_l', probabilities σ(logits), recommended when >= ``threshold``
    (0.5). ``encoders="global"`` / ``"local"`` keep one factor (SafeDrug-G / SafeDrug-L),
    ``use_mask=False`` replaces H by ones (dense W; the no-mask ablation).

    Loss (Sec. 3.4, Eq. 18): β (α L_bce + (1 − α) L_multi) + (1 − β) L_ddi with α = 1 −
    ``margin_weight`` (0.95) and L_ddi = ``ddi_loss_scale`` · Σ_ij A_ij p_i p_j averaged over
    visits (the reference scales by 0.0005). β comes from a :class:`callbacks.PIDDDIController`
    attached to the fit (Eq. 19), which sets ``ddi_controller`` on this module; without one
    β = 1 (no DDI control).

    Drugs without a parseable molecule (reported by ``datamodules.molecules``): with
    ``missing_molecules="fallback"`` the drug's memory row is a learned embedding and its
    row of H gets one private placeholder substructure (one warning with their count and
    share); ``"error"`` refuses such data. A cohort with no molecule at all is refused (when the
    Trainer sets the module up) unless ``allow_missing_molecules``: SafeDrug would then be a GRU
    with learned drug embeddings.
    Likewise a fit with a DDI controller on a cohort without any adverse DDI pair is refused
    unless ``allow_no_ddi``.

    Args:
        embedding_dim: size of code embeddings, GRU states, query and molecule vectors (64).
        dropout: dropout on the code embeddings (0.5).
        mpnn_layers: message-passing rounds L (2).
        fingerprint_radius: Weisfeiler-Lehman radius of the atom fingerprints (2).
        add_hydrogens: explicit hydrogen atoms in the molecule graphs (reference: yes).
        readout: molecule readout, ``mean`` (paper) or ``sum`` (reference code).
        encoders: ``dual`` (SafeDrug), ``global`` (SafeDrug-G) or ``local`` (SafeDrug-L).
        use_mask: multiply the local weights by H (False: dense ablation).
        missing_molecules: ``fallback`` (learned embedding) or ``error``.
        allow_missing_molecules: accept a cohort in which no drug has a molecule (all fallback).
        allow_no_ddi: accept a DDI-controlled fit on a cohort without adverse DDI pairs.
        ddi_loss_scale: factor of the pairwise DDI loss (0.0005).
        margin_weight: 1 − α, weight of the multi-label margin loss (0.05).
        lr_plateau_patience, lr_plateau_factor: when set, multiply the learning rate by the
            factor after ``patience`` epochs without a better ``val_jaccard`` (None: constant lr).
        normalize: layer-normalise the query q and the drug memory E_g and scale E_g q by 1/√d
            before the sigmoid of Eq. 10 (False: the paper). A departure, for conditioning: without
            it E_g q grows until σ saturates and m_g is the same for every patient (the global
            encoder then only rescales drugs), and the unnormalised query can saturate the local
            encoder's σ(W_f q); the measurements are in docs/safedrug.md.
    """

    def __init__(
        self,
        *args,
        embedding_dim: PositiveInt = 64,
        dropout: DropoutRate = 0.5,
        mpnn_layers: int = 2,
        fingerprint_radius: int = 2,
        add_hydrogens: bool = True,
        readout: Literal["mean", "sum"] = "mean",
        encoders: Literal["dual", "global", "local"] = "dual",
        use_mask: bool = True,
        missing_molecules: Literal["fallback", "error"] = "fallback",
        allow_missing_molecules: bool = False,
        allow_no_ddi: bool = False,
        ddi_loss_scale: float = 0.0005,
        margin_weight: float = 0.05,
        lr_plateau_patience: int | None = None,
        lr_plateau_factor: float = 0.3,
        normalize: bool = False,
        **kwargs,
    ):
        super().__init__(*args, margin_weight=margin_weight, **kwargs)
        if encoders not in ("dual", "global", "local"):
            raise ValueError(f"encoders must be 'dual', 'global' or 'local', got {encoders!r}")
        if missing_molecules not in ("fallback", "error"):
            raise ValueError(f"missing_molecules must be 'fallback' or 'error', got {missing_molecules!r}")
        if ddi_loss_scale < 0:
            raise ValueError(f"ddi_loss_scale must be >= 0, got {ddi_loss_scale}")
        if lr_plateau_patience is not None and (lr_plateau_patience < 0 or not 0 < lr_plateau_factor < 1):
            raise ValueError(
                f"lr_plateau_patience must be >= 0 and lr_plateau_factor in (0, 1), got "
                f"{lr_plateau_patience} and {lr_plateau_factor}"
            )
        k = self.knowledge
        n_med, dim = k.num_medications, embedding_dim
        medications = k.vocab["medication"]
        self.ddi_controller = None  # set by callbacks.PIDDDIController for the fit

        self.diag_embedding = nn.Embedding(k.num_diagnoses, dim)
        self.proc_embedding = nn.Embedding(k.num_procedures, dim)
        for table in (self.diag_embedding, self.proc_embedding):
            nn.init.uniform_(table.weight, -0.1, 0.1)  # reference initialisation
        self.dropout = nn.Dropout(dropout)
        self.diag_gru = nn.GRU(dim, dim, batch_first=True)
        self.proc_gru = nn.GRU(dim, dim, batch_first=True)
        self.query = nn.Sequential(nn.ReLU(), nn.Linear(2 * dim, dim))
        self.query_norm = nn.LayerNorm(dim) if normalize else nn.Identity()

        self.use_global = encoders in ("dual", "global")
        self.use_local = encoders in ("dual", "local")
        if self.use_global:
            mols = molecule_graphs(k.smiles, medications, radius=fingerprint_radius, add_hydrogens=add_hydrogens)
            self._check_missing(mols.missing, medications, missing_molecules)
            # Derived from the knowledge (rebuilt on load), hence not stored in checkpoints.
            self.register_buffer("atom_fingerprint", mols.graphs.x.clone(), persistent=False)
            # Bonds as CSR rows/columns (dense buffers: they move, copy and average like any other).
            atoms = mols.graphs.num_nodes
            with warnings.catch_warnings():  # torch flags its sparse CSR support as beta
                warnings.simplefilter("ignore", UserWarning)
                csr = to_torch_csr_tensor(mols.graphs.edge_index, size=(atoms, atoms))
            self.register_buffer("bond_rows", csr.crow_indices().clone(), persistent=False)
            self.register_buffer("bond_columns", csr.col_indices().clone(), persistent=False)
            self.register_buffer("atom_molecule", mols.graphs.batch.clone(), persistent=False)
            self.register_buffer("molecule_drug", mols.molecule_drug.clone(), persistent=False)
            self.register_buffer("missing_drugs", torch.tensor(mols.missing, dtype=torch.long), persistent=False)
            self.num_molecules = mols.num_molecules
            self.molecule_encoder = MoleculeEncoder(mols.num_fingerprints, dim, mpnn_layers, readout)
            self.fallback_memory = nn.Parameter(0.1 * torch.randn(len(mols.missing), dim)) if mols.missing else None
            self.global_ffn = nn.Linear(n_med, n_med)
            self.global_norm = nn.LayerNorm(n_med)
        if self.use_local:
            mask = substructure_mask(k.smiles, medications, placeholders=True)
            self._check_missing(mask.missing, medications, missing_molecules)
            H = mask.tensor() if use_mask else torch.ones(n_med, len(mask.substructures))
            self.register_buffer("substructure_mask", H, persistent=False)
            self.num_substructures = H.shape[1]
            self.functional = nn.Linear(dim, self.num_substructures)
            bound = n_med**-0.5  # reference initialisation of the masked layer
            self.local_weight = nn.Parameter(torch.empty(n_med, self.num_substructures).uniform_(-bound, bound))

    def _check_missing(self, missing, medications, policy: str) -> None:
        if not missing:
            return
        if policy == "error":
            require_molecules(missing, medications, by="SafeDrug")
        if getattr(self, "_warned_missing", False):  # the global and the local encoder both check
            return
        self._warned_missing = True
        if len(missing) == len(medications) and not self.hparams.allow_missing_molecules:
            # Refused in setup, not here: train.py reports a CohortError raised there as one line,
            # while jsonargparse wraps one raised while it builds the model.
            self._no_molecules = list(missing)
            return
        log.warning(molecule_coverage(missing, medications, "SafeDrug", True, self.knowledge.source))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if getattr(self, "_no_molecules", None):
            molecule_coverage(self._no_molecules, self.knowledge.vocab["medication"], "SafeDrug", False,
                              self.knowledge.source)  # fmt: skip

    def on_fit_start(self) -> None:
        if self.ddi_controller is not None and self.hparams.ddi_loss_scale > 0:
            require_ddi_pairs(self.knowledge, "SafeDrug", self.hparams.allow_no_ddi)

    # --- encoders ------------------------------------------------------------------------
    def _visit_vectors(self, embedding: nn.Embedding, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ of the (dropped-out) code embeddings of each visit: (B, T, L) -> (B, T, d) (Sec. 3.2)."""
        return (self.dropout(embedding(codes)) * mask.unsqueeze(-1).to(embedding.weight.dtype)).sum(-2)

    def patient_query(self, batch: VisitBatch) -> torch.Tensor:
        """q_t for every visit (B, T, d): two GRUs over the visit sequence, ReLU, linear (Sec. 3.2)."""
        states = [
            causal_gru(gru, self._visit_vectors(embedding, batch[key], batch[f"{key}_mask"]), batch["lengths"])
            for gru, embedding, key in (
                (self.diag_gru, self.diag_embedding, "diagnoses"),
                (self.proc_gru, self.proc_embedding, "procedures"),
            )
        ]
        return self.query_norm(self.query(torch.cat(states, dim=-1)))

    def atom_adjacency(self) -> torch.Tensor:
        """(N, N) sparse CSR adjacency of all atoms of all molecules (block diagonal, both directions)."""
        atoms = self.atom_fingerprint.shape[0]
        weight = self.molecule_encoder.embedding.weight
        ones = torch.ones(self.bond_columns.shape[0], device=weight.device, dtype=weight.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.bond_rows, self.bond_columns, ones, (atoms, atoms), device=weight.device
            )

    def drug_memory(self) -> torch.Tensor:
        """E_g (M, d): MPNN vector of every molecule, averaged per drug; fallback rows where none."""
        molecules = self.molecule_encoder(
            self.atom_fingerprint, self.atom_adjacency(), self.atom_molecule, self.num_molecules
        )
        memory = scatter(molecules, self.molecule_drug, dim=0, dim_size=self.num_medications, reduce="mean")
        if self.fallback_memory is not None:
            memory = memory.index_copy(0, self.missing_drugs, self.fallback_memory.to(memory.dtype))
        return memory

    def _current_memory(self) -> torch.Tensor:
        """E_g, reused across batches while no gradient is taken and the weights stay unchanged.

        Evaluation runs the MPNN once instead of once per batch. The cache key holds the
        in-place version counter of every weight E_g depends on, so an optimizer step or
        ``load_state_dict`` invalidates it; every loop start clears it too, since callbacks may
        swap weights through ``.data`` (e.g. weight averaging), which no counter sees.
        """
        if torch.is_grad_enabled():
            self._memory_cache = None
            return self.drug_memory()
        weights = list(self.molecule_encoder.parameters())
        if self.fallback_memory is not None:
            weights.append(self.fallback_memory)
        key = tuple((id(w), w._version, w.device) for w in weights)
        cached = getattr(self, "_memory_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.drug_memory())
            self._memory_cache = cached
        return cached[1]

    def _clear_memory_cache(self) -> None:
        self._memory_cache = None

    def on_train_epoch_start(self) -> None:
        self._clear_memory_cache()

    def on_validation_epoch_start(self) -> None:
        self._clear_memory_cache()

    def on_test_epoch_start(self) -> None:
        self._clear_memory_cache()

    def on_predict_epoch_start(self) -> None:
        self._clear_memory_cache()

    def global_vector(self, query: torch.Tensor) -> torch.Tensor:
        """m_g' = LayerNorm(m_g + FFN(m_g)) with m_g = σ(E_g q) (Eq. 10–11): (B, T, d) -> (B, T, M)."""
        memory = self._current_memory()
        if self.hparams.normalize:
            memory = F.layer_norm(memory, memory.shape[-1:]) / memory.shape[-1] ** 0.5
        match = torch.sigmoid(query @ memory.t())
        return self.global_norm(match + self.global_ffn(match))

    def local_vector(self, query: torch.Tensor) -> torch.Tensor:
        """m_l' = (W ⊙ H) σ(W_f q + b_f): substructure functionality -> drugs (B, T, M)."""
        functional = torch.sigmoid(self.functional(query))
        return functional @ (self.local_weight * self.substructure_mask).t()

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        query = self.patient_query(batch)
        if self.use_global and self.use_local:
            logits = self.global_vector(query) * self.local_vector(query)
        elif self.use_global:
            logits = self.global_vector(query)
        else:
            logits = self.local_vector(query)
        return logits * batch["visit_mask"].unsqueeze(-1).to(logits.dtype)

    # --- loss ----------------------------------------------------------------------------
    def compute_loss(
        self, logits: torch.Tensor, batch: VisitBatch, beta: float | torch.Tensor = 1.0
    ) -> dict[str, torch.Tensor]:
        """β (α BCE + (1 − α) margin) + (1 − β) L_ddi (Eq. 18); entries other than ``loss`` are logged."""
        with float32(logits):
            logits = logits.float()
            mask = batch["visit_mask"]
            flat, target = logits[mask], batch["medications"][mask]
            w = self.hparams.margin_weight
            out = {
                "bce": F.binary_cross_entropy_with_logits(flat, target),
                "margin": F.multilabel_margin_loss(torch.sigmoid(flat), margin_targets(target)),
                "ddi": self.hparams.ddi_loss_scale * ddi_loss(torch.sigmoid(logits), self.ddi_adj, mask),
            }
            accuracy = (1 - w) * out["bce"] + w * out["margin"]
            beta = torch.as_tensor(beta, dtype=accuracy.dtype, device=accuracy.device)
            out["loss"] = beta * accuracy + (1 - beta) * out["ddi"]
            return out

    def training_step(self, batch: VisitBatch, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        beta = 1.0
        if self.ddi_controller is not None:
            with torch.no_grad():
                counts = batch_pair_counts(
                    torch.sigmoid(logits.float()), batch["visit_mask"], self.ddi_adj, self.hparams.threshold
                )
            beta = self.ddi_controller.update(*counts)
        losses = self.compute_loss(logits, batch, beta)
        self.log_train_losses(losses, batch_size=len(batch["lengths"]))
        return losses["loss"]

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_plateau_patience is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=self.hparams.lr_plateau_factor, patience=self.hparams.lr_plateau_patience
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_jaccard"}}

"""Weighted neighbourhood sums as sparse matrix products, for DPR-WG's GRU-gated GNN.

DPR-WG aggregates m_u = Σ_v ê_vu x_v over the edges v→u of every package graph (Eq. 11). The
message-passing form (gather x_v per edge, scale, scatter-add) allocates several (edges × dim)
tensors per layer and per backward pass; MIMIC package graphs are dense (a training batch holds
≈ 135k edges on ≈ 6.6k nodes), so those allocations are much of the step. Written as a product
with the sparse (nodes × nodes) matrix A[u, v] = ê_vu, the forward pass is one CSR × dense
product, the gradient for x one product with Aᵀ, and the gradient for the edge weights one
sampled dense–dense product (SDDMM) at A's nonzeros: no per-edge tensor of width dim is ever
built. torch's own CSR autograd would densify A (nodes²) to return the weight gradient, hence
the explicit backward here.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch_geometric.nn import GatedGraphConv

SPARSE_DEVICES = ("cpu", "cuda")


class CSRLayout(NamedTuple):
    """Where each edge lands in a CSR matrix: ``order`` sorts the edges into its rows."""

    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, cols: torch.Tensor, n: int) -> CSRLayout:
        order = torch.argsort(rows * n + cols)
        crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        return cls(crow, cols[order], order)

    def matrix(self, edge_values: torch.Tensor, n: int) -> torch.Tensor:
        """The (n × n) CSR matrix holding ``edge_values`` (in edge order) at the edges' places."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.col, edge_values[self.order], (n, n), check_invariants=False)


class EdgeLayouts(NamedTuple):
    """CSR layouts of A (rows = targets) and Aᵀ (rows = sources) of one edge set, built once per graph
    batch and shared by every layer and both passes."""

    incoming: CSRLayout
    outgoing: CSRLayout

    @classmethod
    def of(cls, edge_index: torch.Tensor, num_nodes: int) -> EdgeLayouts:
        src, dst = edge_index
        return cls(CSRLayout.of(dst, src, num_nodes), CSRLayout.of(src, dst, num_nodes))


class WeightedSum(torch.autograd.Function):
    """out[u] = Σ_{edges v→u} weight_vu · x[v]: (E,), (N, D), EdgeLayouts -> (N, D).

    Edges must be distinct (package graphs are). Differentiable in ``weight`` and ``x``.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, x: torch.Tensor, layouts: EdgeLayouts) -> torch.Tensor:
        dtype = torch.promote_types(weight.dtype, x.dtype)  # one dtype for the sparse kernels (autocast)
        ctx.layouts = layouts
        ctx.save_for_backward(weight, x)
        return torch.sparse.mm(layouts.incoming.matrix(weight.to(dtype), x.shape[0]), x.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, x = ctx.saved_tensors
        layouts, n, dtype = ctx.layouts, x.shape[0], grad.dtype
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.sparse.mm(layouts.outgoing.matrix(weight.to(dtype), n), grad).to(x.dtype)
        if ctx.needs_input_grad[0]:
            # d(out[u]·grad[u]) / d weight_vu = grad[u] · x[v], taken at A's nonzeros only (SDDMM)
            pattern = layouts.incoming.matrix(grad.new_ones(len(weight)), n)
            sampled = torch.sparse.sampled_addmm(pattern, grad, x.to(dtype).T, beta=0.0)
            grad_weight = torch.empty_like(weight)
            grad_weight[layouts.incoming.order] = sampled.values().to(weight.dtype)
        return grad_weight, grad_x, None


def weighted_sum(
    weight: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor, layouts: EdgeLayouts | None = None
) -> torch.Tensor:
    """Σ over incoming edges of weight · source state, as a sparse product (see ``WeightedSum``);
    ``layouts`` (``EdgeLayouts.of(edge_index, len(x))``) when several calls share the edges."""
    return WeightedSum.apply(weight, x, layouts if layouts is not None else EdgeLayouts.of(edge_index, x.shape[0]))


class SparseGatedGraphConv(GatedGraphConv):
    """torch-geometric's GatedGraphConv (Li et al., gated graph sequence networks; DPR Eq. 11–13):
    m_u = Σ_v e_vu W_l h_v, h_u ← GRU(m_u, h_u) for each of ``num_layers`` steps, with the sum
    taken as a sparse product (``weighted_sum``) instead of per-edge messages. Same parameters,
    so checkpoints of either load into the other; same function up to float rounding. Devices
    without sparse CSR kernels (anything but CPU and CUDA, e.g. Apple's MPS) take the parent's
    message passing.
    """

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None):
        if x.device.type not in SPARSE_DEVICES:
            return super().forward(x, edge_index, edge_weight)
        if x.size(-1) > self.out_channels:
            raise ValueError(f"input width {x.size(-1)} exceeds the layer's {self.out_channels} channels")
        if x.size(-1) < self.out_channels:
            x = torch.cat([x, x.new_zeros(x.size(0), self.out_channels - x.size(-1))], dim=1)
        if edge_weight is None:
            edge_weight = x.new_ones(edge_index.shape[1])
        layouts = EdgeLayouts.of(edge_index, x.shape[0])  # the same edges for every layer
        for i in range(self.num_layers):
            x = self.rnn(weighted_sum(edge_weight, x @ self.weight[i], edge_index, layouts), x)
        return x

"""DPR's message passing: a GRU cell on every edge, summed at the target (Zheng et al., WWW 2021, Eq. 11–13).

For every edge v→u the GRU cell reads the message from v with u's state as its hidden state; the
cell outputs are summed at u, and an MLP updates u from its own state and that sum:

    M_u = Σ_v GRU(x_vu, h_u),    h_u ← MLP(W₀ h_u + M_u).

DPR-WG's message is the source state scaled by the signed edge weight, x_vu = ê_vu · W₁ h_v;
DPR-AG's carries the edge's attribute vector, x_vu = MLP([h_v ‖ ê_vu]). A gated graph network
(GatedGraphConv) instead sums the messages first and runs the cell once per node; here the cell
sees each interaction on its own, so an antagonism's negative weight acts through the cell's
gates rather than cancelling a synergy's positive one inside the sum.

Cost: the GRU's matrix products are taken per node wherever they can be. The hidden-state part
W_h h_u depends on u alone, and for DPR-WG the input part W_i (ê_vu W₁ h_v) = ê_vu (W_i W₁ h_v)
depends on v alone, so DPR-WG's per-edge work is element-wise only. That element-wise work is
``summed_edge_gru``: one autograd node that walks the edges in cache-sized chunks and recomputes
the gates in the backward pass, instead of a dozen (edges × 3·dim) tensors kept for autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

EDGE_CHUNK = 2048  # edges per chunk on CPU: its (chunk × 3·dim) gates stay in cache (fastest of 512–32768 measured)
ACCELERATOR_EDGE_CHUNK = 1 << 16  # elsewhere the number of kernel launches counts, not the cache


def edge_chunk(device: torch.device) -> int:
    return EDGE_CHUNK if device.type == "cpu" else ACCELERATOR_EDGE_CHUNK


def gru_cell_output(input_gates: torch.Tensor, hidden_gates: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """nn.GRUCell's output from its two projections: ``input_gates`` = W_i x + b_i and
    ``hidden_gates`` = W_h h + b_h, each (rows, 3·dim) in torch's (reset, update, new) order."""
    i_r, i_z, i_n = input_gates.chunk(3, dim=-1)
    h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return (1 - update) * new + update * hidden


def _input_gates(part, node_gates, edge_scale, edge_gates, bias, src):
    """W_i x_vu + b_i of the edges in ``part``: edge_scale · node_gates[src] + edge_gates + bias."""
    gates = bias.expand(part.stop - part.start, -1)
    if node_gates is not None:
        per_source = node_gates.index_select(0, src[part])
        gates = gates + (per_source if edge_scale is None else edge_scale[part].unsqueeze(-1) * per_source)
    if edge_gates is not None:
        gates = gates + edge_gates[part]
    return gates


def _cell(input_gates, hidden_gates, dim):
    """(reset, update, new) of the GRU cell, hidden gates already gathered per edge."""
    reset_update = torch.sigmoid(input_gates[:, : 2 * dim] + hidden_gates[:, : 2 * dim])
    reset, update = reset_update[:, :dim], reset_update[:, dim:]
    new = torch.tanh(torch.addcmul(input_gates[:, 2 * dim :], reset, hidden_gates[:, 2 * dim :]))
    return reset, update, new


class _SummedEdgeGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, node_gates, edge_scale, edge_gates, bias, hidden_gates, h, src, dst):
        num_edges, dim, chunk = dst.numel(), h.shape[1], edge_chunk(h.device)
        summed = h.new_zeros(h.shape)
        for start in range(0, num_edges, chunk):
            part = slice(start, min(start + chunk, num_edges))
            target = dst[part]
            gi = _input_gates(part, node_gates, edge_scale, edge_gates, bias, src)
            _, update, new = _cell(gi, hidden_gates.index_select(0, target), dim)
            summed.index_add_(0, target, torch.lerp(new, h.index_select(0, target), update))
        ctx.save_for_backward(node_gates, edge_scale, edge_gates, bias, hidden_gates, h, src, dst)
        return summed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_summed):
        node_gates, edge_scale, edge_gates, bias, hidden_gates, h, src, dst = ctx.saved_tensors
        num_edges, dim, chunk = dst.numel(), h.shape[1], edge_chunk(h.device)
        needs = ctx.needs_input_grad
        g_node = torch.zeros_like(node_gates) if needs[0] else None
        g_scale = torch.empty_like(edge_scale) if needs[1] else None
        g_edge = torch.empty_like(edge_gates) if needs[2] else None
        g_bias = torch.zeros_like(bias) if needs[3] else None
        g_hidden = torch.zeros_like(hidden_gates) if needs[4] else None
        g_h = torch.zeros_like(h) if needs[5] else None
        for start in range(0, num_edges, chunk):
            part = slice(start, min(start + chunk, num_edges))
            target = dst[part]
            hg = hidden_gates.index_select(0, target)
            ht = h.index_select(0, target)
            reset, update, new = _cell(_input_gates(part, node_gates, edge_scale, edge_gates, bias, src), hg, dim)
            go = grad_summed.index_select(0, target)
            # out = (1 - z) n + z h;  n = tanh(a_n + r · hg_n);  r, z = σ(a_r + hg_r), σ(a_z + hg_z)
            d_new = go * (1 - update) * (1 - new * new)
            d_reset = d_new * hg[:, 2 * dim :] * reset * (1 - reset)
            d_update = go * (ht - new) * update * (1 - update)
            d_input = torch.cat([d_reset, d_update, d_new], dim=1)
            if g_hidden is not None:
                g_hidden.index_add_(0, target, torch.cat([d_reset, d_update, d_new * reset], dim=1))
            if g_h is not None:
                g_h.index_add_(0, target, go * update)
            if g_bias is not None:
                g_bias += d_input.sum(0)
            if g_edge is not None:
                g_edge[part] = d_input
            if node_gates is not None:
                sources = src[part]
                if g_scale is not None:
                    g_scale[part] = (d_input * node_gates.index_select(0, sources)).sum(1)
                if g_node is not None:
                    scaled = d_input if edge_scale is None else edge_scale[part].unsqueeze(-1) * d_input
                    g_node.index_add_(0, sources, scaled)
        return g_node, g_scale, g_edge, g_bias, g_hidden, g_h, None, None


def summed_edge_gru(
    hidden_gates: torch.Tensor,
    h: torch.Tensor,
    edge_index: torch.Tensor,
    bias: torch.Tensor,
    node_gates: torch.Tensor | None = None,
    edge_scale: torch.Tensor | None = None,
    edge_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """M_u = Σ_{v→u} GRUCell(x_vu, h_u), (nodes, dim).

    The cell's input projection of each edge is W_i x_vu + b_i = edge_scale_vu · node_gates_v
    + edge_gates_vu + ``bias`` (either part may be absent; edge_scale only with node_gates);
    ``hidden_gates`` = W_h h + b_h per node. Equal to ``gru_cell_output`` per edge followed by a
    scatter-sum, within rounding.
    """
    if node_gates is None and edge_gates is None:
        raise ValueError("summed_edge_gru needs node_gates, edge_gates or both")
    if edge_scale is not None and node_gates is None:
        raise ValueError("summed_edge_gru: edge_scale scales node_gates, which are missing")
    given = [t for t in (node_gates, edge_scale, edge_gates, bias, hidden_gates, h) if t is not None]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in given))  # mixed precision: one dtype

    def cast(t):
        return None if t is None else t.to(dtype)

    src, dst = edge_index
    return _SummedEdgeGRU.apply(
        cast(node_gates), cast(edge_scale), cast(edge_gates), cast(bias), cast(hidden_gates), cast(h), src, dst
    )


class EdgeGRUUpdate(nn.Module):
    """What both of DPR's layers share: M_u = Σ_v GRU(x_vu, h_u), then h_u ← MLP(W₀ h_u + M_u)."""

    def __init__(self, dim: int):
        super().__init__()
        self.cell = nn.GRUCell(dim, dim)
        self.self_loop = nn.Linear(dim, dim)  # W₀
        self.update_out = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim))  # MLP after W₀ h_u + M_u

    def combine(self, h: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        return self.update_out(self.self_loop(h) + summed)

    def hidden_gates(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.cell.weight_hh, self.cell.bias_hh)


class EdgeGRUConv(EdgeGRUUpdate):
    """DPR-WG's layer (Eq. 11–13): x_vu = ê_vu · W₁ h_v, M_u = Σ_v GRU(x_vu, h_u), h_u ← MLP(W₀ h_u + M_u)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.message_weight = nn.Linear(dim, dim, bias=False)  # W₁

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        # W_i (ê W₁ h_v) + b_i = ê (W_i W₁ h_v) + b_i: the product is taken per source node
        per_source = F.linear(self.message_weight(h), self.cell.weight_ih)
        summed = summed_edge_gru(
            self.hidden_gates(h), h, edge_index, self.cell.bias_ih, node_gates=per_source, edge_scale=edge_weight
        )
        return self.combine(h, summed)


class AttributedEdgeGRUConv(EdgeGRUUpdate):
    """DPR-AG's layer (Eq. 18–20): x_vu = MLP([h_v ‖ ê_vu]), M_u = Σ_v GRU(x_vu, h_u), h_u ← MLP(W₀ h_u + M_u).

    The message MLP's linear part on [h_v ‖ ê_vu] is split into a node part (computed once per
    node) and an edge part, the same function as one linear layer on the concatenation.
    """

    def __init__(self, dim: int, edge_dim: int):
        super().__init__(dim)
        self.message_node = nn.Linear(dim, dim)
        self.message_edge = nn.Linear(edge_dim, dim, bias=False)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        messages = torch.relu(self.message_node(h)[edge_index[0]] + self.message_edge(edge_attr))
        edge_gates = F.linear(messages, self.cell.weight_ih)
        summed = summed_edge_gru(self.hidden_gates(h), h, edge_index, self.cell.bias_ih, edge_gates=edge_gates)
        return self.combine(h, summed)


class EdgeGRUNetwork(nn.Module):
    """``num_layers`` EdgeGRUConv layers, each with its own weights: DPR-WG's GNN."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EdgeGRUConv(dim) for _ in range(num_layers))

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, edge_index, edge_weight)
        return h

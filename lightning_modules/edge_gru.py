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
depends on v alone, so DPR-WG's per-edge work is element-wise only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing


def gru_cell_output(input_gates: torch.Tensor, hidden_gates: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """nn.GRUCell's output from its two projections: ``input_gates`` = W_i x + b_i and
    ``hidden_gates`` = W_h h + b_h, each (rows, 3·dim) in torch's (reset, update, new) order."""
    i_r, i_z, i_n = input_gates.chunk(3, dim=-1)
    h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return (1 - update) * new + update * hidden


class EdgeGRUUpdate(MessagePassing):
    """What both of DPR's layers share: M_u = Σ_v GRU(x_vu, h_u), then h_u ← MLP(W₀ h_u + M_u).

    Subclasses define the messages (``input_gates`` per edge: W_i x_vu + b_i).
    """

    def __init__(self, dim: int):
        super().__init__(aggr="add")
        self.cell = nn.GRUCell(dim, dim)
        self.self_loop = nn.Linear(dim, dim)  # W₀
        self.update_out = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim))  # MLP after W₀ h_u + M_u

    def combine(self, h: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        return self.update_out(self.self_loop(h) + summed)

    def hidden_gates(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.cell.weight_hh, self.cell.bias_hh)

    def message(self, input_gates: torch.Tensor, hidden_gates_i: torch.Tensor, h_i: torch.Tensor) -> torch.Tensor:
        return gru_cell_output(input_gates, hidden_gates_i, h_i)


class EdgeGRUConv(EdgeGRUUpdate):
    """DPR-WG's layer (Eq. 11–13): x_vu = ê_vu · W₁ h_v, M_u = Σ_v GRU(x_vu, h_u), h_u ← MLP(W₀ h_u + M_u)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.message_weight = nn.Linear(dim, dim, bias=False)  # W₁

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        src = edge_index[0]
        # W_i (ê W₁ h_v) + b_i = ê (W_i W₁ h_v) + b_i: the product is taken per source node
        per_source = F.linear(self.message_weight(h), self.cell.weight_ih)
        input_gates = edge_weight.unsqueeze(-1) * per_source[src] + self.cell.bias_ih
        summed = self.propagate(edge_index, input_gates=input_gates, hidden_gates=self.hidden_gates(h), h=h)
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
        src = edge_index[0]
        messages = torch.relu(self.message_node(h)[src] + self.message_edge(edge_attr))
        input_gates = F.linear(messages, self.cell.weight_ih, self.cell.bias_ih)
        summed = self.propagate(edge_index, input_gates=input_gates, hidden_gates=self.hidden_gates(h), h=h)
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

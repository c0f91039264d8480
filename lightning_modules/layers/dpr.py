"""DPR's graph layers (Zheng et al., WWW 2021, §4.3): pair linear maps and DPR-AG's gated convolution."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import MessagePassing


class PairLinear(nn.Module):
    """Linear layer on the concatenation [x_a ‖ x_b] of two node states, for every edge.

    W [x_a ‖ x_b] + c = W_a x_a + W_b x_b + c: both products are taken once per node and
    gathered per edge, which is the same function as ``nn.Linear(2·dim, out)`` on the
    concatenation at a fraction of the cost (graphs have far more edges than nodes).
    """

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.first = nn.Linear(dim, out)
        self.second = nn.Linear(dim, out, bias=False)

    def forward(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.first(x)[first] + self.second(x)[second]


class AttributedGraphConv(MessagePassing):
    """DPR-AG's layer with ``message_passing: gated``: m_vu = MLP([h_v ‖ ê_vu]), a_u = Σ_v m_vu, h_u ← GRU(a_u, h_u).

    The message MLP's linear part on [h_v ‖ ê_vu] is split into a node part (computed once per
    node) and an edge part, the same function as one linear layer on the concatenation.
    """

    def __init__(self, dim: int, edge_dim: int):
        super().__init__(aggr="add")
        self.message_node = nn.Linear(dim, dim)
        self.message_edge = nn.Linear(edge_dim, dim, bias=False)
        self.update_cell = nn.GRUCell(dim, dim)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        messages = self.propagate(edge_index, x=self.message_node(x), edge_attr=self.message_edge(edge_attr))
        return self.update_cell(messages, x)

    def message(self, x_j: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_j + edge_attr)

"""DPR's per-edge GRU layers against a literal edge-by-edge evaluation of Eq. 11–13 / 18–20."""

import pytest
import torch
from torch import nn

from lightning_modules.edge_gru import AttributedEdgeGRUConv, EdgeGRUConv, EdgeGRUNetwork, gru_cell_output

# a 4-node graph: node 0 receives from 1 and 2, node 1 from 0, node 2 from 3, node 3 from nobody
EDGES = torch.tensor([[1, 2, 0, 3], [0, 0, 1, 2]])


def literal(layer, h, message):
    """M_u = Σ_v GRUCell(message(edge), h_u) one edge at a time, then MLP(W₀ h_u + M_u)."""
    summed = torch.zeros_like(h)
    for k, (v, u) in enumerate(EDGES.T.tolist()):
        summed[u] += layer.cell(message(k, v).unsqueeze(0), h[u].unsqueeze(0)).squeeze(0)
    return layer.update_out(layer.self_loop(h) + summed)


def test_gru_cell_output_is_torchs_gru_cell():
    torch.manual_seed(0)
    cell, x, h = nn.GRUCell(5, 5), torch.randn(7, 5), torch.randn(7, 5)
    gates_x = x @ cell.weight_ih.T + cell.bias_ih
    gates_h = h @ cell.weight_hh.T + cell.bias_hh
    torch.testing.assert_close(gru_cell_output(gates_x, gates_h, h), cell(x, h))


def test_weighted_layer_is_a_gru_per_edge_summed_at_the_target():
    torch.manual_seed(0)
    layer, h = EdgeGRUConv(6), torch.randn(4, 6)
    weight = torch.tensor([1.0, -1.0, 0.3, 0.05])  # synergy, antagonism, co-occurrence p
    expected = literal(layer, h, lambda k, v: weight[k] * layer.message_weight(h[v]))
    torch.testing.assert_close(layer(h, EDGES, weight), expected)


def test_attributed_layer_is_a_gru_per_edge_on_the_attribute_message():
    torch.manual_seed(0)
    layer, h, attr = AttributedEdgeGRUConv(6, 3), torch.randn(4, 6), torch.randn(4, 3)
    expected = literal(layer, h, lambda k, v: torch.relu(layer.message_node(h[v]) + layer.message_edge(attr[k])))
    torch.testing.assert_close(layer(h, EDGES, attr), expected)


def test_a_node_without_incoming_edges_keeps_only_its_own_update():
    torch.manual_seed(0)
    layer, h = EdgeGRUConv(6), torch.randn(4, 6)
    out = layer(h, EDGES, torch.ones(4))
    torch.testing.assert_close(out[3], layer.update_out(layer.self_loop(h[3])))


def test_the_sign_of_an_edge_weight_reaches_the_target_and_its_gradient():
    torch.manual_seed(0)
    layer, h = EdgeGRUConv(6), torch.randn(4, 6)
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    out = layer(h, EDGES, weight)
    flipped = layer(h, EDGES, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    assert not torch.allclose(out[0], flipped[0])  # edge 2→0 turned antagonistic changes node 0
    torch.testing.assert_close(out[1:], flipped[1:])  # and nothing else
    out[0].sum().backward()
    assert weight.grad[:2].abs().min() > 0 and weight.grad[2:].abs().max() == 0  # only 0's in-edges


@pytest.mark.parametrize("num_layers", [1, 3])
def test_network_stacks_layers_with_their_own_weights(num_layers):
    torch.manual_seed(0)
    net, h, w = EdgeGRUNetwork(6, num_layers), torch.randn(4, 6), torch.rand(4)
    expected = h
    for layer in net.layers:
        expected = layer(expected, EDGES, w)
    torch.testing.assert_close(net(h, EDGES, w), expected)
    assert len({id(layer.cell.weight_ih) for layer in net.layers}) == num_layers

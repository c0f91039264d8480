"""DPR's per-edge GRU layers against a literal edge-by-edge evaluation of Eq. 11–13 / 18–20."""

import pytest
import torch
from torch import nn

from lightning_modules import edge_gru
from lightning_modules.edge_gru import (
    AttributedEdgeGRUConv,
    EdgeGRUConv,
    EdgeGRUNetwork,
    gru_cell_output,
    summed_edge_gru,
)

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


def reference_summed_edge_gru(hidden_gates, h, edge_index, bias, node_gates=None, edge_scale=None, edge_gates=None):
    """Plain autograd: every edge's input gates, torch's GRU cell per edge, scatter-sum at the target."""
    src, dst = edge_index
    gates = bias.expand(src.numel(), -1)
    if node_gates is not None:
        gates = gates + (node_gates[src] if edge_scale is None else edge_scale.unsqueeze(-1) * node_gates[src])
    if edge_gates is not None:
        gates = gates + edge_gates
    out = gru_cell_output(gates, hidden_gates[dst], h[dst])
    return torch.zeros_like(h).index_add(0, dst, out)


def random_inputs(num_nodes, num_edges, dim, parts, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    tensors = {
        "hidden_gates": torch.randn(num_nodes, 3 * dim, generator=g, dtype=dtype),
        "h": torch.randn(num_nodes, dim, generator=g, dtype=dtype),
        "bias": torch.randn(3 * dim, generator=g, dtype=dtype),
        "node_gates": torch.randn(num_nodes, 3 * dim, generator=g, dtype=dtype),
        "edge_scale": torch.randn(num_edges, generator=g, dtype=dtype),
        "edge_gates": torch.randn(num_edges, 3 * dim, generator=g, dtype=dtype),
    }
    kept = {k: v.requires_grad_() for k, v in tensors.items() if k in ("hidden_gates", "h", "bias") or k in parts}
    return edge_index, kept


PARTS = [("node_gates", "edge_scale"), ("edge_gates",), ("node_gates",), ("node_gates", "edge_scale", "edge_gates")]


@pytest.mark.parametrize("parts", PARTS)
def test_summed_edge_gru_gradients_across_chunk_boundaries(parts, monkeypatch):
    monkeypatch.setattr(edge_gru, "EDGE_CHUNK", 3)  # 11 edges: chunks of 3, 3, 3, 2
    edge_index, inputs = random_inputs(6, 11, 2, parts)
    names = list(inputs)

    def fused(*tensors):
        return summed_edge_gru(edge_index=edge_index, **dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(fused, tuple(inputs.values()))


@pytest.mark.parametrize("parts", PARTS)
def test_summed_edge_gru_is_the_per_edge_gru_cell_summed(parts):
    edge_index, inputs = random_inputs(900, 5000, 8, parts, dtype=torch.float32)  # three chunks of 2048
    fused = summed_edge_gru(edge_index=edge_index, **inputs)
    grads = torch.autograd.grad(fused.square().sum(), list(inputs.values()))
    expected = reference_summed_edge_gru(edge_index=edge_index, **inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(inputs.values()))
    torch.testing.assert_close(fused, expected)
    for name, got, want in zip(inputs, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_summed_edge_gru_without_edges_is_zero_and_passes_zero_gradients():
    edge_index, inputs = random_inputs(4, 0, 3, PARTS[0])
    out = summed_edge_gru(edge_index=edge_index, **inputs)
    out.sum().backward()
    assert out.abs().max() == 0 and inputs["h"].grad.abs().max() == 0 and inputs["edge_scale"].grad.shape == (0,)


def test_summed_edge_gru_computes_mixed_precision_inputs_in_the_wider_type():
    edge_index, inputs = random_inputs(30, 80, 4, PARTS[0], dtype=torch.float32)
    half = {**inputs, "hidden_gates": inputs["hidden_gates"].detach().bfloat16()}  # as autocast leaves a linear
    out = summed_edge_gru(edge_index=edge_index, **half)
    assert out.dtype == torch.float32
    expected = reference_summed_edge_gru(
        edge_index=edge_index, **{**inputs, "hidden_gates": half["hidden_gates"].float()}
    )
    torch.testing.assert_close(out, expected)


def test_summed_edge_gru_needs_an_input_part():
    edge_index, inputs = random_inputs(4, 5, 3, ())
    with pytest.raises(ValueError, match="needs node_gates, edge_gates or both"):
        summed_edge_gru(edge_index=edge_index, **inputs)


def test_summed_edge_gru_refuses_an_edge_scale_without_node_gates():
    edge_index, inputs = random_inputs(4, 5, 3, ("edge_scale", "edge_gates"))
    with pytest.raises(ValueError, match="edge_scale scales node_gates, which are missing"):
        summed_edge_gru(edge_index=edge_index, **inputs)

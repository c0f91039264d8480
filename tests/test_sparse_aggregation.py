"""DPR-WG's sparse-product aggregation equals torch-geometric's message passing, gradients included."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import GatedGraphConv

from lightning_modules.sparse_aggregation import SparseGatedGraphConv, weighted_sum


def distinct_edges(num_nodes: int, count: int, seed: int = 0) -> torch.Tensor:
    pairs = torch.randperm(num_nodes * num_nodes, generator=torch.Generator().manual_seed(seed))[:count]
    src, dst = pairs % num_nodes, pairs // num_nodes
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


def test_weighted_sum_of_a_hand_made_graph():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    edges = torch.tensor([[0, 1, 2], [2, 2, 0]])  # 0→2, 1→2, 2→0
    weight = torch.tensor([2.0, -1.0, 0.5])
    out = weighted_sum(weight, x, edges)
    assert torch.equal(out, torch.tensor([[1.5, 2.0], [0.0, 0.0], [2.0, -1.0]]))


def test_weighted_sum_gradients_match_finite_differences():
    edges = distinct_edges(12, 40)
    weight = torch.randn(edges.shape[1], dtype=torch.double, requires_grad=True)
    x = torch.randn(12, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_sum, (weight, x, edges))


@pytest.mark.parametrize("weighted", [True, False])
def test_sparse_gated_graph_conv_equals_the_message_passing_layer(weighted):
    torch.manual_seed(0)
    edges = distinct_edges(60, 500)
    reference = GatedGraphConv(8, 2, aggr="add").double()
    sparse = SparseGatedGraphConv(8, 2, aggr="add").double()
    sparse.load_state_dict(reference.state_dict())  # same parameters: checkpoints carry over
    x = torch.randn(60, 5, dtype=torch.double, requires_grad=True)  # narrower input is zero-padded
    weight = torch.randn(edges.shape[1], dtype=torch.double, requires_grad=True) if weighted else None
    upstream = torch.randn(60, 8, dtype=torch.double)
    results = []
    for layer in (reference, sparse):
        x.grad = None
        if weight is not None:
            weight.grad = None
        layer.zero_grad()
        out = layer(x, edges, weight)
        (out * upstream).sum().backward()
        grads = [x.grad.clone(), layer.weight.grad.clone(), layer.rnn.weight_ih.grad.clone()]
        results.append([out.detach(), *grads, *([weight.grad.clone()] if weight is not None else [])])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_graphs_without_edges_only_run_the_gru():
    layer = SparseGatedGraphConv(4, 1)
    x = torch.randn(3, 4, requires_grad=True)
    out = layer(x, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, requires_grad=True))
    torch.testing.assert_close(out, layer.rnn(torch.zeros(3, 4), x))
    out.sum().backward()
    assert x.grad is not None


def test_wider_input_than_the_layer_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        SparseGatedGraphConv(4, 1)(torch.randn(3, 5), torch.zeros(2, 0, dtype=torch.long))


def test_devices_without_sparse_kernels_take_message_passing(monkeypatch):
    import lightning_modules.sparse_aggregation as module

    torch.manual_seed(0)
    layer = SparseGatedGraphConv(6, 2)
    edges, x = distinct_edges(20, 80), torch.randn(20, 6)
    weight = torch.randn(edges.shape[1])
    sparse = layer(x, edges, weight)
    calls = []
    monkeypatch.setattr(module, "SPARSE_DEVICES", ("cuda",))  # as if this CPU were such a device
    monkeypatch.setattr(module, "weighted_sum", lambda *a: calls.append(a))
    torch.testing.assert_close(layer(x, edges, weight), sparse)
    assert calls == []

"""DPR's package graphs on the model's device (Zheng et al., WWW 2021, §4.1)."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch

from datamodules.package_graph import GraphMatrices, PackageKnowledge, build_package_graphs


class PackageGraphBuilder(nn.Module):
    """Builds the package graphs of a whole batch of packages at once (§4.1).

    ``build(packages)`` takes a (G, L) long tensor of drug indices padded with -1 and returns
    one torch-geometric ``Batch`` (``datamodules.package_graph.build_package_graphs``), so it
    runs inside ``forward`` for the evaluation candidates. The matrices are those of the
    knowledge (``PackageKnowledge.graph_matrices``, built once and shared with the training
    collator), held as non-persistent buffers: they belong to the data, and move with the
    model's device.
    """

    def __init__(self, matrices: GraphMatrices):
        super().__init__()
        self.register_buffer("relation", matrices.relation, persistent=False)
        self.register_buffer("cooccurrence", matrices.cooccurrence, persistent=False)
        self.register_buffer("adjacency", matrices.adjacency, persistent=False)

    @classmethod
    def from_knowledge(cls, knowledge: PackageKnowledge) -> PackageGraphBuilder:
        return cls(knowledge.graph_matrices)

    def build(self, packages: torch.Tensor) -> Batch:
        return build_package_graphs(packages, GraphMatrices(self.relation, self.cooccurrence, self.adjacency))

"""Layers and model-side building blocks shared by the methods (no LightningModule here)."""

from lightning_modules.layers.dpr import AttributedGraphConv, PairLinear
from lightning_modules.layers.package_graphs import PackageGraphBuilder
from lightning_modules.layers.retrieval import nearest_candidates

__all__ = ["AttributedGraphConv", "PackageGraphBuilder", "PairLinear", "nearest_candidates"]

"""Float32 islands under mixed precision (``--trainer.precision=bf16-mixed`` / ``16-mixed``).

Autocast runs matrix products in half precision even on float32 inputs. The losses (BCE, margin,
the DDI loss Σ pᵀAp over M² pairs) and the evaluation (metrics, DDI pair counts, ELOS retrieval)
are sums over many small terms where bfloat16's 8-bit mantissa loses whole drugs, so they run
inside :func:`float32` on float32 copies of the model's outputs.
"""

from __future__ import annotations

import torch


def float32(reference: torch.Tensor) -> torch.autocast:
    """Context with autocast off on ``reference``'s device (a no-op outside mixed precision)."""
    return torch.autocast(device_type=reference.device.type, enabled=False)

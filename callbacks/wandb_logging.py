"""Weights & Biases logging that never blocks a run: offline without an API key."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_credentials_present() -> bool:
    """An API key in the environment or in ~/.netrc (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class MedRecWandbLogger(WandbLogger):
    """WandbLogger that switches to ``WANDB_MODE=offline`` (saying so once) when no key is configured.

    ``WANDB_MODE`` set by the user (``online``, ``offline``, ``disabled``) always wins; offline
    runs can be uploaded later with ``wandb sync``.
    """

    def __init__(self, project: str = "medrec", name: str | None = None, tags: list[str] | None = None, **kwargs):
        if "WANDB_MODE" not in os.environ and not wandb_credentials_present():
            os.environ["WANDB_MODE"] = "offline"
            rank_zero_info("medrec: no W&B API key configured; logging offline (upload later with `wandb sync`)")
        super().__init__(project=project, name=name, tags=tags, **kwargs)

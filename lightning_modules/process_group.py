"""Orderly shutdown of the torch.distributed process group when a DDP process exits."""

from __future__ import annotations

import atexit
import weakref

import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerStatus

_state: dict = {"registered": False, "trainer": None}


def destroy_process_group_at_exit(trainer) -> None:
    """Destroy the default process group before interpreter finalisation, if ``trainer`` finished.

    Lightning leaves the group alive when a DDP worker returns. gloo's worker threads may then
    still hold tensors whose release needs the GIL while the interpreter is being torn down,
    which aborts a process that finished its work ("terminate called without an active
    exception", SIGABRT) — intermittently; pytorch/pytorch#179291 describes it. An ``atexit``
    handler (registered once per process) destroys the group while the interpreter is still
    whole. It leaves the group alone when the latest trainer did not finish (it raised or was
    interrupted): destroying it while other ranks may be inside a collective can hang.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    _state["trainer"] = weakref.ref(trainer)
    if not _state["registered"]:
        atexit.register(_destroy)
        _state["registered"] = True


def _destroy() -> None:
    trainer = _state["trainer"]() if _state["trainer"] is not None else None
    finished = trainer is None or trainer.state.status == TrainerStatus.FINISHED
    if finished and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

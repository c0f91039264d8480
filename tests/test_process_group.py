"""A DDP process destroys its process group at exit after a finished run, and only then."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import atexit, sys
    import torch.distributed as dist
    from lightning.pytorch.trainer.states import TrainerStatus
    from lightning_modules.process_group import destroy_process_group_at_exit

    # atexit runs handlers last-registered-first: this one reports after medrec's has run
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    class Trainer:  # what the hook reads of a lightning Trainer
        class state:
            status = TrainerStatus[sys.argv[2]]

    trainer = Trainer()
    destroy_process_group_at_exit(trainer)
    destroy_process_group_at_exit(trainer)  # registers once
    """
)


@pytest.mark.parametrize("status, left_initialized", [("FINISHED", False), ("INTERRUPTED", True), ("RUNNING", True)])
def test_group_destroyed_at_exit_only_after_a_finished_run(tmp_path, status, left_initialized):
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "store"), status], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [f"initialized at exit: {left_initialized}"]

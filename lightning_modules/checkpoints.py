"""Where a run's checkpoints live, and what a checkpoint given to ``train.py`` must agree with.

Lightning puts every fit in a new folder, ``<save_dir>/<name>/<version>/checkpoints`` (``name`` is
the logger's name, W&B's project; ``version`` is ``version_N`` or the W&B run id). So that
``--ckpt_path last`` continues a run instead of starting a new one, train.py resolves it here
(and ``best``, and a run folder) to one checkpoint file and the run folder it belongs to.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from datamodules.errors import CheckpointError
from datamodules.safe_pickle import load_checkpoint

LAST = "last.ckpt"


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _get(namespace, key: str, default=None):
    if namespace is None:
        return default
    value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class RunLayout:
    """The checkpoint folders a config's fits write (mirrors ModelCheckpoint's default dirpath).

    ``dirpath``: an explicit ``--checkpoint.dirpath`` (one folder, reused by every fit);
    else ``root`` holds one folder per run, and ``version`` names one when the logger fixes it.
    """

    root: Path | None = None
    version: str | None = None
    dirpath: Path | None = None

    @classmethod
    def from_config(cls, config) -> RunLayout:
        dirpath = _get(_get(config, "checkpoint"), "dirpath")
        if dirpath is not None:
            return cls(dirpath=Path(dirpath))
        trainer = _get(config, "trainer")
        root_dir = Path(_get(trainer, "default_root_dir", "."))
        logger = _get(trainer, "logger", True)
        if logger is False:
            return cls(dirpath=root_dir / "checkpoints")
        if logger is True:
            return cls(root=root_dir / "lightning_logs")
        if isinstance(logger, list):
            logger = logger[0]
        args = _get(logger, "init_args")
        from lightning.pytorch.loggers import WandbLogger

        is_wandb = issubclass(import_class(_get(logger, "class_path")), WandbLogger)
        name = _get(args, "project" if is_wandb else "name", "lightning_logs")
        version = _get(args, "version", _get(args, "id") if is_wandb else None)
        if isinstance(version, int):
            version = f"version_{version}"
        return cls(root=Path(_get(args, "save_dir", root_dir)) / name, version=version)

    def runs(self) -> list[Path]:
        """Run folders holding a last.ckpt, oldest first (by when that checkpoint was written)."""
        if self.root is None or not self.root.is_dir():
            return []
        found = [p.parent.parent for p in self.root.glob(f"*/checkpoints/{LAST}")]
        return sorted(found, key=lambda run: (run / "checkpoints" / LAST).stat().st_mtime)

    def describe(self) -> str:
        if self.dirpath is not None:
            return str(self.dirpath / LAST)
        return str(self.root / (self.version or "*") / "checkpoints" / LAST)

    def run_of(self, checkpoint: Path) -> Path | None:
        """The run folder of a checkpoint written in this layout (None outside it)."""
        if self.root is None or checkpoint.parent.name != "checkpoints":
            return None
        run = checkpoint.parent.parent
        return run if run.parent.resolve() == self.root.resolve() else None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    run: Path | None  # the run folder, when the checkpoint lies in the default layout


def resolve_checkpoint(ckpt_path: str, layout: RunLayout, option: str = "--ckpt_path") -> ResolvedCheckpoint:
    """``last`` / ``best`` (of the latest run, or of the run the logger's version names), a run
    folder, or a checkpoint file; a one-line CheckpointError when there is nothing to load."""
    if ckpt_path in ("last", "best"):
        if layout.dirpath is not None:
            last, run = layout.dirpath / LAST, None
        elif layout.version is not None:
            run = layout.root / layout.version
            last = run / "checkpoints" / LAST
        else:
            runs = layout.runs()
            run = runs[-1] if runs else None
            last = run / "checkpoints" / LAST if run else None
        if last is None or not last.is_file():
            raise CheckpointError(
                f"{option} {ckpt_path}: no run to continue or load: {layout.describe()} does not exist "
                "(train first with `fit`, or give a checkpoint file or run folder)"
            )
        if ckpt_path == "best":
            last = best_of(last, option)
        return ResolvedCheckpoint(last, run)
    path = Path(ckpt_path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return ResolvedCheckpoint(candidate, path if candidate.parent.name == "checkpoints" else None)
        raise CheckpointError(f"{option} {ckpt_path}: a folder without checkpoints/{LAST} or {LAST}")
    if not path.is_file():
        raise CheckpointError(f"{option} {ckpt_path}: no such checkpoint file")
    return ResolvedCheckpoint(path, layout.run_of(path))


def read_checkpoint(path: Path, option: str = "--ckpt_path") -> dict:
    """The checkpoint's contents, loaded without running code (weights_only)."""
    try:
        checkpoint = load_checkpoint(path)  # one line for a truncated, foreign or unsafe file
    except CheckpointError as err:
        raise CheckpointError(f"{option} {err}") from None
    named = [checkpoint.get("medrec_model_class"), (checkpoint.get("hyper_parameters") or {}).get("_class_path")]
    for class_path in named:  # imported later: importing a module not loaded yet could run its code
        module = str(class_path).rpartition(".")[0]
        if class_path is not None and not ((module + ".").startswith("lightning_modules.") or module in sys.modules):
            raise CheckpointError(f"{option} {path}: names model class {class_path!r}, which is not a medrec model")
    return checkpoint


def best_of(last: Path, option: str = "--ckpt_path") -> Path:
    """The best checkpoint its run's last.ckpt records (ModelCheckpoint's state)."""
    states = read_checkpoint(last, option).get("callbacks", {})
    recorded = [s.get("best_model_path") for k, s in states.items() if k.startswith("ModelCheckpoint")]
    recorded = [p for p in recorded if p]
    if not recorded:
        raise CheckpointError(f"{option} best: {last} records no best checkpoint")
    # the run may have been moved since: look beside last.ckpt first
    for candidate in (last.parent / Path(recorded[0]).name, Path(recorded[0])):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{option} best: {last} records {recorded[0]}, which no longer exists")

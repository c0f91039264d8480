"""The methods medrec has, discovered from ``configs/*.yaml`` instead of listed by hand.

Every top-level YAML in ``configs/`` is a runnable ``train.py --config``. A config is a *main*
method config unless its first lines hold a variant header, a YAML comment (LightningCLI
rejects unknown top-level keys, so the header must not be a key)::

    # medrec-variant: {of: dpr_ag, own: [model.init_args.type_weight]}

``of`` names the parent config (file stem), ``own`` the dotted settings that make the variant;
every other setting must equal the parent's (tests/test_configs.py checks it). An empty ``own``
makes an alias: the parent under another name (``recommended`` is ``updater``), its runs filed
under its own run name. Benchmarks
(leaderboard, DDP checks) run the main configs; tests run them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HEADER = "# medrec-variant:"
HEADER_LINES = 10  # the header sits among the first comment lines


@dataclass(frozen=True)
class Variant:
    """A variant config: its parent's stem and the dotted settings it changes (or drops)."""

    parent: str
    own: tuple[str, ...]


def config_path(name: str) -> Path:
    """``configs/<name>.yaml``."""
    return CONFIGS / f"{name}.yaml"


def all_configs() -> list[str]:
    """Stems of every config in ``configs/`` (sweeps and logger sub-folders excluded), sorted."""
    return sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def variant_of(name: str) -> Variant | None:
    """The variant header of ``configs/<name>.yaml``, or None for a main method config."""
    lines = config_path(name).read_text().splitlines()[:HEADER_LINES]
    for line in lines:
        if line.startswith(HEADER):
            header = yaml.safe_load(line[len(HEADER) :])
            if (
                not isinstance(header, dict)
                or not isinstance(header.get("of"), str)
                or not isinstance(header.get("own"), list)
            ):
                raise ValueError(f"configs/{name}.yaml: the header must read '{HEADER} {{of: <parent>, own: [<key>]}}'")
            if not config_path(header["of"]).is_file():
                raise ValueError(f"configs/{name}.yaml is a variant of {header['of']}, which has no config")
            return Variant(parent=header["of"], own=tuple(header["own"]))
    return None


def variant_configs() -> dict[str, Variant]:
    """{variant stem: its header} for every variant config."""
    return {name: variant for name in all_configs() if (variant := variant_of(name)) is not None}


def method_configs() -> list[str]:
    """Stems of the main (non-variant) configs, sorted: one per method the benchmarks compare."""
    return [name for name in all_configs() if variant_of(name) is None]

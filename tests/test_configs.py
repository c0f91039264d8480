"""Variant configs (ablations, other forms) stay their parent config except for what makes them the variant.

A setting changed in a parent (say the learning rate of configs/dpr_ag.yaml) and not in its variants would make
every ablation table compare unlike runs; this catches that drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

VARIANTS = {  # variant: (parent, {setting: the variant's value})
    "dpr_ag_drug_mask": ("dpr_ag", {"model.init_args.mask_layer": "drug"}),
    "dpr_ag_no_type": ("dpr_ag", {"model.init_args.type_weight": 0.0}),
    # without the mask layer the two mask forms are one network, so the key is left out
    "dpr_ag_no_mask": ("dpr_ag", {"model.init_args.use_mask": False, "model.init_args.mask_layer": None}),
    "dpr_wg_no_context": ("dpr_wg", {"model.init_args.use_context": False}),
    "dpr_wg_no_type": ("dpr_wg", {"model.init_args.edge_weights": "cooccurrence"}),
    "dpr_gnn": (
        "dpr_wg",
        {
            "model.init_args.use_mask": False,
            "model.init_args.use_context": False,
            "model.init_args.edge_weights": "structure",
        },
    ),
    "safedrug_l": ("safedrug", {"model.init_args.encoders": "local"}),
    "safedrug_g": ("safedrug", {"model.init_args.encoders": "global"}),
    "safedrug_nomask": ("safedrug", {"model.init_args.use_mask": False}),
}


def settings(name: str) -> dict:
    """The config as {dotted key: value}, without the run name its logger files under."""

    def flatten(tree: dict, prefix: str = "") -> dict:
        flat = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    flat = flatten(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    assert flat.pop("trainer.logger.init_args.name") == name, f"configs/{name}.yaml logs under another run name"
    return flat


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_config_is_its_parent_but_for_its_own_settings(variant):
    parent, own = VARIANTS[variant]
    expected = settings(parent)
    for key, value in own.items():
        assert key in expected, f"{key} is not a setting of configs/{parent}.yaml"
        if value is None:
            del expected[key]
        else:
            assert expected[key] != value, f"configs/{parent}.yaml already sets {key}: {value}"
            expected[key] = value
    assert settings(variant) == expected

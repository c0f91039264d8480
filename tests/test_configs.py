"""Variant configs (ablations, other forms) stay their parent config except for what makes them the variant.

A setting changed in a parent (say the learning rate of configs/dpr_ag.yaml) and not in its variants would make
every ablation table compare unlike runs; this catches that drift."""

from __future__ import annotations

import pytest
import yaml

from lightning_modules.registry import CONFIGS, method_configs, variant_configs

VARIANTS = variant_configs()  # variant: its parent and own settings, from the config's header


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


def under(key: str, flat: dict) -> dict:
    """The settings of ``flat`` at ``key`` or below it."""
    return {name: value for name, value in flat.items() if name == key or name.startswith(f"{key}.")}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_config_is_its_parent_but_for_its_own_settings(variant):
    parent, own = VARIANTS[variant].parent, VARIANTS[variant].own
    expected, actual = settings(parent), settings(variant)
    for key in own:
        # an own key covers its sub-keys (`ddi_controller` owns ddi_controller.init_args.*)
        mine, theirs = under(key, actual), under(key, expected)
        # a setting the variant drops is one its parent has; one it sets must differ from the parent's
        assert mine or theirs, f"{key} is set neither in configs/{parent}.yaml nor in {variant}.yaml"
        assert mine != theirs, f"configs/{parent}.yaml already sets {key}"
        for name in theirs:
            del expected[name]
        expected.update(mine)
    drift = {k: (expected.get(k, "<unset>"), actual.get(k, "<unset>")) for k in expected.keys() | actual.keys()}
    drift = {k: pair for k, pair in drift.items() if pair[0] != pair[1]}
    assert not drift, f"configs/{variant}.yaml departs from {parent}.yaml beyond its own settings: {drift}"


def test_every_method_has_a_main_config_and_variants_hang_off_main_configs():
    mains = set(method_configs())
    assert {"frequency", "safedrug", "gamenet", "miranda", "dpr_wg", "dpr_ag"} <= mains
    assert VARIANTS, "no variant config found: the header format changed?"
    assert {variant.parent for variant in VARIANTS.values()} <= mains, "a variant of a variant"
    # README's recommended model is an alias: PrescriptionUpdater's config under another run name
    assert VARIANTS["recommended"].parent == "updater" and VARIANTS["recommended"].own == ()


def test_a_malformed_variant_header_or_a_missing_parent_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from lightning_modules import registry

    monkeypatch.setattr(registry, "CONFIGS", tmp_path)
    (tmp_path / "base.yaml").write_text("model: {}\n")
    (tmp_path / "bad.yaml").write_text("# medrec-variant: {of: base}\nmodel: {}\n")
    (tmp_path / "orphan.yaml").write_text("# medrec-variant: {of: gone, own: [model.x]}\nmodel: {}\n")
    with pytest.raises(ValueError, match=r"configs/bad.yaml: the header must read"):
        registry.variant_of("bad")
    with pytest.raises(ValueError, match=r"configs/orphan.yaml is a variant of gone, which has no config"):
        registry.variant_of("orphan")
    assert registry.variant_of("base") is None

"""Option types that LightningCLI checks at parse time, and the same rules for Python callers.

Used as ``__init__`` annotations, jsonargparse refuses an out-of-range value before any work
starts, naming the option (``Parser key "model.init_args.lr": ... does not conform to
restriction v>0``). Parsed values are instances of these float/int subclasses: ``plain``
turns them back into builtin numbers before they reach hyperparameters, which checkpoints store
and ``torch.load(weights_only=True)`` reads only as plain types.
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from datamodules.errors import OptionError

Probability = restricted_number_type("Probability", float, [(">", 0), ("<=", 1)])
"""A decision threshold in (0, 1]: at 0 every drug is recommended, above 1 none."""

DropoutRate = restricted_number_type("DropoutRate", float, [(">=", 0), ("<", 1)])
"""A dropout probability in [0, 1): at 1 every unit is dropped."""

__all__ = [
    "ClosedUnitInterval",
    "DropoutRate",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "check_range",
    "plain",
]


def plain(value: Any) -> Any:
    """``value`` with restricted numbers (and those inside tuples, lists, dicts) as builtin ones."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def check_range(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, open_low=False, open_high=False
) -> None:
    """Raise ``OptionError`` naming ``name`` unless ``value`` is a number in the interval."""
    if value is None:
        return
    lo = "(" if open_low else "["
    hi = ")" if open_high else "]"
    rule = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number in {rule}, got {value!r}") from None
    bad = number != number  # NaN
    if low is not None:
        bad |= number <= low if open_low else number < low
    if high is not None:
        bad |= number >= high if open_high else number > high
    if bad:
        raise OptionError(f"{name} must lie in {rule}, got {value!r}")

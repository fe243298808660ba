"""A span of training tied to the data, not to the budget: CS-Fluctuation's window M and the stop margin.

The paper sets M to one epoch for images (images x repeats / batch) and to 100 steps of 1,500 for
LLaMA. A window that is a fraction of the *planned* steps makes the stop a fixed fraction of whatever
budget the user typed: on one CS series the turning point falls at about 1-5x M (issue 23). So a span
is given in steps or in epochs; a fraction of train.steps stays accepted, as an explicit choice only.

Accepted values (normalised by `parse_span`, resolved by `span_steps`):
    30, "30", {steps = 30}              steps                       -> 30 (int)
    "2 epochs", "1 epoch", {epochs = 2} epochs (may be fractional)  -> "2 epochs" (str)
    "5%", 0.05, {fraction = 0.05}       a fraction of train.steps   -> 0.05 (float)
An epoch is the number of optimizer steps that show every training item once:
ceil(items x repeats / (batch_size x grad_accum)) (`steps_per_epoch`). Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any

Span = int | float | str  # steps | fraction of train.steps | "N epochs"

_EPOCHS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*epochs?\s*$")
_HELP = 'steps (e.g. 30), epochs ("2 epochs" or {epochs = 2}) or a fraction of train.steps ("5%")'


def _epochs(value: float, key: str) -> str:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{key}: {value!r} epochs; more than 0 are needed")
    return f"{value:g} epochs"


def parse_span(v: Any, key: str, minimum: int) -> Span:
    """A span in its normal form (see the module docstring); ValueError naming `key` otherwise."""
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in ("steps", "epochs", "fraction"):
            raise ValueError(f"{key}: a table must hold one of steps, epochs or fraction, got {sorted(v)}")
        unit, amount = next(iter(v.items()))
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ValueError(f"{key}: {unit} = {amount!r} is not a number")
        if unit == "epochs":
            return _epochs(float(amount), key)
        if unit == "fraction":
            if not 0 < amount < 1:
                raise ValueError(f"{key}: fraction = {amount!r}; a fraction of train.steps is in (0, 1)")
            return float(amount)
        v = amount
        if isinstance(v, float) and v != int(v):
            raise ValueError(f"{key}: steps = {v!r} is not a whole number")
        v = int(v)
    if isinstance(v, bool):
        raise ValueError(f"{key}: expected {_HELP}")
    if isinstance(v, str):
        text = v.strip()
        m = _EPOCHS.match(text.lower())
        if m:
            return _epochs(float(m.group(1)), key)
        try:
            v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"{key}: {text!r} is not {_HELP}") from None
        if not text.endswith("%") and v == int(v) and v >= 1:
            v = int(v)
    if isinstance(v, float) and v == int(v) and v >= 1:
        v = int(v)
    if isinstance(v, int):
        if v < minimum:
            raise ValueError(f"{key}: {v} steps; at least {minimum}")
        return v
    if isinstance(v, float) and 0 < v < 1:
        return v
    raise ValueError(f"{key}: {v!r} is neither steps (>= {minimum}), epochs, nor a fraction in (0, 1)")


def epochs_of(span: Span) -> float | None:
    """The number of epochs of a span in epochs, else None."""
    return float(span.split()[0]) if isinstance(span, str) else None


def steps_per_epoch(items: int, batch_size: int, grad_accum: int = 1, repeats: int = 1) -> int:
    """Optimizer steps that show each of `items` training items `repeats` times (at least 1)."""
    if items < 1:
        raise ValueError(f"an epoch of {items} training items")
    return max(1, math.ceil(items * repeats / (batch_size * grad_accum)))


def span_steps(span: Span, total: int, minimum: int, epoch_steps: int | None = None) -> int:
    """Steps of a span in a run of `total` planned steps (at least `minimum`).

    `epoch_steps` (`steps_per_epoch`) is needed only for a span in epochs; steps and epochs never
    depend on `total`, a fraction does (that is its point, and its flaw).
    """
    epochs = epochs_of(span)
    if epochs is not None:
        if epoch_steps is None:
            raise ValueError(f"{span!r}: an epoch's steps are not known (the training set's size is needed)")
        return max(minimum, round(epochs * epoch_steps))
    if isinstance(span, int):
        return span
    return max(minimum, round(float(span) * total))


__all__ = ["Span", "epochs_of", "parse_span", "span_steps", "steps_per_epoch"]

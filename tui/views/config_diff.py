"""What differs between the configs of compared jobs: the keys (dotted, `train.lr`) whose values
are not the same in all of them, one line each with every job's value in the jobs' order."""

from __future__ import annotations

from typing import Any

SKIPPED = frozenset({"name", "output_dir"})  # the legend names the jobs; folders always differ


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def config_diff(configs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(key, the value in each config, "-" where unset) for every key whose values differ."""
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f} - SKIPPED)
    out = []
    for key in keys:
        values = [f.get(key, "-") for f in flat]
        if any(v != values[0] for v in values[1:]):
            out.append((key, [str(v) for v in values]))
    return out


def diff_lines(jobs: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """The diff as lines to show: `train.lr   1e-4 | 3e-3`, the jobs named in a header line."""
    rows = config_diff(configs)
    if not rows:
        return ["configs: the same (but for name and output folder)"]
    width = max(len(k) for k, _ in rows)
    return [f"config differences ({' | '.join(jobs)}):"] + [
        f"  {key:<{width}}  {' | '.join(values)}" for key, values in rows
    ]

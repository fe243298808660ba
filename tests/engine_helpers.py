"""Helpers shared by the engine's tests: a small job config on the tiny model, reading outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dallm.config import JobConfig, config_from_dict


def job(model: Path, images: Path, **sections: dict[str, Any]) -> JobConfig:
    """A CPU job on the tiny model: 6 steps, CS on, no early stop, checkpoints every 3 steps."""
    data: dict[str, Any] = {
        "model": {"base": str(model)},
        "data": {"dir": str(images), "instance_prompt": "a red circle"},
        "train": {"steps": 6, "device": "cpu", "lr": 1e-3},
        "monitor": {"window": 2, "early_stop": "off"},
        "checkpoint": {"every": 3, "keep": None},
        "eval": {"mode": "inline"},  # background evaluation has its own tests (test_eval_worker.py)
    }
    for name, values in sections.items():
        if name in ("name", "seed"):
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

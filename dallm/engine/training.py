"""What every job kind's trainer uses the same way: the device, the seeds, the isolation of the
training RNG from evaluation, AdamW with the `[train]` LR schedule, and the order of the examples.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dallm.config import ConfigError, TrainConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run evaluation without touching the training RNG streams (resume stays exact)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def optimizer_and_schedule(
    groups: list[dict[str, Any]] | list[torch.nn.Parameter], tc: TrainConfig
) -> tuple[Any, Any]:
    """AdamW over `groups` and the LR schedule of `[train]` (image and LLM trainers alike)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        groups,
        lr=tc.lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_eps,
        weight_decay=tc.weight_decay,
    )
    name = "constant_with_warmup" if tc.lr_scheduler == "constant" and tc.warmup_steps else tc.lr_scheduler
    return optimizer, get_scheduler(
        name, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps
    )


def batch_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Sample indices `start .. start+count-1` of an endless sequence of shuffled epochs over n items.

    Epoch e is a permutation drawn from a generator seeded with (seed, e), so any position of the
    sequence can be computed directly: no sampler state needs saving for an exact resume.
    """
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out

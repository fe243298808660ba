"""Torch threads sized from the slot's cores and what other work is using."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dallm.engine.threads import choose_threads, explicit_threads


@pytest.mark.parametrize(
    ("slot", "cores", "busy", "want"),
    [(2, 2, 0.0, 2), (2, 2, 0.9, 1), (2, 2, 2.0, 1), (4, 16, 3.0, 4), (8, 16, 12.2, 4), (1, 16, 0.0, 1)],
)
def test_choose_threads(slot: int, cores: int, busy: float, want: int) -> None:
    assert choose_threads(slot, cores, busy) == want


def test_explicit_threads_from_env() -> None:
    assert explicit_threads({}) is None
    assert explicit_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert explicit_threads({"DALLM_THREADS": "2", "OMP_NUM_THREADS": "3"}) == 2
    with pytest.raises(ValueError, match=r"^DALLM_THREADS='two': use a whole number of threads >= 1$"):
        explicit_threads({"DALLM_THREADS": "two"})


def test_worker_sets_threads_from_its_slot() -> None:
    code = (
        "import os; os.environ.pop('OMP_NUM_THREADS', None); os.environ.pop('DALLM_THREADS', None);"
        "from dallm.engine.threads import set_torch_threads; line = set_torch_threads(1);"
        "import torch; print(torch.get_num_threads(), line)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("1 torch threads: 1 (slot of 1 of ")

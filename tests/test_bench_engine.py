"""bench/gpu_peaks.py: the peak table, MFU text and the FLOP count the engine benchmark prints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_peaks import count_flops, mfu_text, peak_tflops  # noqa: E402


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "no", 66.9),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H200 NVL", "bf16", 835.0),
        ("NVIDIA A100-SXM4-80GB", "no", 19.5),
    ],
)
def test_peak_of_known_gpus(name: str, precision: str, peak: float) -> None:
    got = peak_tflops(name, precision)
    assert got is not None and got[0] == peak


def test_mfu_text() -> None:
    assert mfu_text(98.94, "NVIDIA H200", "bf16") == "10.0% of H200 SXM bf16 989.4"
    assert mfu_text(1.0, "cpu (x86_64)", "no") == "n/a (no peak known for cpu (x86_64))"


def test_count_flops_forward_and_backward_of_a_linear() -> None:
    """Forward x W^T (2mnk), backward: grad of x and of W (2mnk each)."""
    m, k, n = 8, 16, 4
    layer = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * m * k * n

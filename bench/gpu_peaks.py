"""Peak dense throughput of known GPUs and FLOPs of one step: achieved TFLOP/s and model FLOPs
utilisation (MFU = achieved / peak) for bench/bench_engine.py."""

from __future__ import annotations

from collections.abc import Callable

# TFLOP/s, dense (NVIDIA's tables give the tensor-core figures "with sparsity": dense is half).
# Sources: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/): H100 SXM
# BF16/FP16 1,979 sparse -> 989.4 dense, FP32 67 (66.9: 132 SMs x 128 FP32 lanes x 2 x 1.98 GHz);
# H100 NVL 1,671 -> 835, FP32 60; H100 PCIe 1,513 -> 756, FP32 51. NVIDIA H200 page
# (nvidia.com/en-us/data-center/h200/): H200 SXM as H100 SXM (same GH100 compute), H200 NVL 1,671
# -> 835, FP32 60. NVIDIA A100 datasheet: BF16 312 dense, FP32 19.5.
# The FP32 column is the non-tensor-core peak; PyTorch runs fp32 convolutions in TF32 on tensor
# cores by default (torch.backends.cudnn.allow_tf32), so an fp32 "MFU" can be high against it.
PEAKS: list[tuple[str, str, float, float]] = [  # (name contains, label, bf16/fp16 dense, fp32)
    ("H200 NVL", "H200 NVL", 835.0, 60.0),
    ("H200", "H200 SXM", 989.4, 66.9),
    ("H100 NVL", "H100 NVL", 835.0, 60.0),
    ("H100 PCIe", "H100 PCIe", 756.0, 51.2),
    ("H100", "H100 SXM", 989.4, 66.9),
    ("A100", "A100", 312.0, 19.5),
]


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"{device} ({platform.processor() or platform.machine()})"


def peak_tflops(name: str, precision: str) -> tuple[float, str] | None:
    """(peak TFLOP/s, label) for a device name and "no" (fp32) / "bf16" / "fp16"; None if unknown."""
    for key, label, half, fp32 in PEAKS:
        if key.lower() in name.lower():
            return (fp32, f"{label} fp32 {fp32:g}") if precision == "no" else (half, f"{label} bf16 {half:g}")
    return None


def mfu_text(tflops: float, name: str, precision: str) -> str:
    peak = peak_tflops(name, precision)
    if peak is None:
        return f"n/a (no peak known for {name})"
    return f"{100 * tflops / peak[0]:.1f}% of {peak[1]}"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (forward and backward), by torch's FlopCounterMode (matmuls,
    convolutions, attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())

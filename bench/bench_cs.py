"""CS (Eq. 2) cost: the identity (never forms B A) vs forming B A, at Stable Diffusion 1.5's UNet shape.

The UNet is built offline from SD 1.5's config (written below) with random weights, and gets peft
LoRA on to_q / to_k / to_v / to_out.0 like a dallm job (128 layers). Three ways of computing CS,
timed side by side in one run, on the same weights:

    identity  dallm.monitor.cs.CosineSimilarity: <BA,W> = sum(B * (W A^T)), ||BA||^2 = sum((B^T B)*(A A^T))
              (on CUDA replayed from a CUDA graph; "eager" is the same without the graph)
    formed    the same in float32 but forming B A (d x k) per layer, one sync at the end
    peft-f64  dallm.monitor.cs.cs_naive: peft's get_delta_weight, float64, a sync per layer (test reference)

    python bench/bench_cs.py                                # CPU, rank 4, float32 base weights
    python bench/bench_cs.py --device cuda --dtype bf16 --rank 4 16 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sd15 import SD15_UNET  # bench/sd15.py (scripts run from bench/)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@torch.no_grad()
def cs_formed(pairs) -> float:
    dots, nb, nw = [], [], []
    for p in pairs:
        delta = p.b2d().float() @ p.a2d().float()
        w = p.w2d().float()
        dots.append(torch.sum(delta * w))
        nb.append(torch.linalg.vector_norm(delta))
        nw.append(torch.linalg.vector_norm(w))
    dot, nb_, nw_ = torch.stack(dots), torch.stack(nb), torch.stack(nw)
    denom = nb_ * nw_
    return float(torch.where(denom > 0, dot / denom.clamp_min(1e-30), torch.zeros_like(dot)).mean().item())


def timed(fn, device: torch.device, repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    value = 0.0
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = fn()  # each returns a Python float: synchronised
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="frozen UNet weights")
    ap.add_argument("--rank", type=int, nargs="+", default=[4])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--skip-f64", action="store_true", help="skip the slow float64 peft reference")
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from dallm.monitor.cs import CosineSimilarity, cs_naive, lora_pairs

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).requires_grad_(False)
    print(
        f"SD 1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params, {args.dtype}) "
        f"built on {device} in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        f"{'rank':>4} {'layers':>6} {'LoRA params':>11} | {'identity':>10} {'eager':>10} {'formed':>10} "
        f"{'peft-f64':>10} | {'formed/identity':>15} {'f64/identity':>12} | {'|identity-f64|':>14}"
    )
    print(header)
    print("-" * len(header))
    for rank in args.rank:
        name = f"r{rank}"
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"),
            adapter_name=name,
        )
        unet.set_adapter(name)
        pairs = lora_pairs(unet, name)
        with torch.no_grad():  # trained-looking LoRA: B != 0, in float32 as a trainer keeps it
            for p in pairs:
                p.b.normal_(0, 0.01)
        n_params = sum(p.a.numel() + p.b.numel() for p in pairs)
        cs = CosineSimilarity(unet, name, cuda_graph=True)
        t_id, v_id = timed(cs, device, args.repeat)
        t_eager, _ = timed(CosineSimilarity(unet, name, cuda_graph=False), device, args.repeat)
        t_formed, v_formed = timed(lambda pairs=pairs: cs_formed(pairs), device, args.repeat)
        if args.skip_f64:
            t_f64, v_f64 = float("nan"), float("nan")
        else:
            t_f64, v_f64 = timed(lambda name=name: cs_naive(unet, name), device, max(2, args.repeat // 5))
        print(
            f"{rank:>4} {len(pairs):>6} {n_params / 1e6:>10.2f}M | {t_id * 1e3:>8.2f}ms {t_eager * 1e3:>8.2f}ms "
            f"{t_formed * 1e3:>8.2f}ms "
            f"{t_f64 * 1e3:>8.1f}ms | {t_formed / t_id:>15.2f} {t_f64 / t_id:>12.1f} | {abs(v_id - v_f64):>14.2e}"
        )
        assert abs(v_id - v_formed) < 1e-4, (v_id, v_formed)


if __name__ == "__main__":
    main()

"""Two jobs on one GPU (`dallm-daemon start --devices 0x2`) vs one job at a time: total training
throughput, as a ratio. Each job is a separate process (as the daemon's workers are) training the
same LoRA step as the engine (dallm.image.trainer.ImageTrainer, bench/bench_engine.py's model shapes, random
weights: nothing downloaded). After their warm-up, packed jobs start timing together (a file
barrier), so the figure is steady-state throughput while both share the device.

    python bench/bench_packing.py                          # GPU: sd15 shape, bf16, 512x512
    python bench/bench_packing.py --device cpu --shape micro --steps 20   # the mechanism, on CPU

Prints steps/s of one job alone, of two packed (sum), the ratio, and each process's peak memory.
Without a GPU and without --device cpu it says so: "not measured (no GPU lent)".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One job: load, warm up, wait for the others, time `steps` steps; print a JSON line."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    import torch
    from bench_engine import load

    from dallm.config import config_from_dict
    from dallm.image.data import ImageSet
    from dallm.image.trainer import ImageTrainer

    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    mixed = device.type == "cuda" and args.mixed_precision != "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision] if mixed else torch.float32
    torch.manual_seed(args.index)
    parts = load(args.shape, device, dtype)
    res = args.resolution or parts.resolution
    pixels = torch.rand(4, 3, res, res) * 2 - 1
    images = ImageSet(pixels, ["a red circle"] * 4, [Path(f"{i}.png") for i in range(4)])
    cfg = config_from_dict({"data": {"dir": tempfile.mkdtemp()}, "lora": {"rank": 4},
                            "train": {"steps": 10**6, "batch_size": args.batch_size, "device": args.device,
                                      "mixed_precision": args.mixed_precision if mixed else "no"},
                            "monitor": {"window": 10, "early_stop": "notify"}})  # fmt: skip
    trainer = ImageTrainer(cfg, parts, images, None, device)
    for i in range(args.warmup):
        trainer.step(i)
    barrier = Path(args.barrier)
    (barrier / f"ready-{args.index}").touch()
    while len(list(barrier.glob("ready-*"))) < args.jobs:
        time.sleep(0.01)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(args.steps):
        trainer.step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = int(torch.cuda.max_memory_reserved()) if device.type == "cuda" else 0
    print(json.dumps({"steps": args.steps, "seconds": seconds, "peak": peak}), flush=True)


def run(args: argparse.Namespace, jobs: int) -> list[dict]:
    barrier = Path(tempfile.mkdtemp(prefix="dallm-pack-"))
    cmd = [sys.executable, __file__, "--child", "--jobs", str(jobs), "--barrier", str(barrier)]
    for key in (
        "device",
        "shape",
        "steps",
        "warmup",
        "batch_size",
        "resolution",
        "mixed_precision",
        "threads",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    procs = [
        subprocess.Popen([*cmd, "--index", str(i)], stdout=subprocess.PIPE, text=True) for i in range(jobs)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"bench_packing: a job failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--shape", choices=["sd15", "tiny", "micro"], default="sd15")
    p.add_argument("--steps", type=int, default=40, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads per job")
    p.add_argument("--repeats", type=int, default=2, help="alone/packed runs, alternated; medians")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.device is None:
        import torch

        if not torch.cuda.is_available():
            print("packed vs one at a time, GPU: not measured (no GPU lent); "
                  "`--device cpu --shape micro` shows the mechanism on CPU")  # fmt: skip
            return None
        args.device = "cuda"
    alone, packed = [], []
    for _ in range(args.repeats):
        one = run(args, 1)[0]
        alone.append(one["steps"] / one["seconds"])
        two = run(args, 2)
        packed.append(sum(r["steps"] / r["seconds"] for r in two))
        peaks = [r["peak"] for r in two]
    a, b = statistics.median(alone), statistics.median(packed)
    label = (
        "GPU"
        if args.device.startswith("cuda")
        else "CPU (mechanism only; cores are shared, not a GPU figure)"
    )
    print(f"{label}: shape {args.shape}, {args.steps} timed steps per job, {args.repeats} repeats")
    print(f"  one job alone: {a:.2f} steps/s (runs: {', '.join(f'{x:.2f}' for x in alone)})")
    print(f"  two jobs packed: {b:.2f} steps/s in all (runs: {', '.join(f'{x:.2f}' for x in packed)})")
    print(f"  packed / one at a time: {b / a:.2f}x")
    if any(peaks):
        print(f"  peak reserved memory per job: {', '.join(f'{x / 2**30:.1f} GiB' for x in peaks)}")
    return None


if __name__ == "__main__":
    main()

"""What live evaluation costs the trainer: `eval.mode` inline vs background, and the shared feature
cache cold vs warm, side by side in one run.

    .venv/bin/python bench/bench_eval.py [--steps 120] [--every 30]

1. The quickstart (`configs/quickstart.toml`, micro model, CPU) cut to `--steps` steps with early
   stopping off, KID every `--every` steps and sample grids every 2 x `--every`, once inline and once
   in background mode (warm cache for both, so the comparison is only where the work runs). Printed:
   each run's `eval_share` (the trainer's seconds on or waiting for evaluation over its wall time,
   eval/summary.json), wall time, the evaluator process's own seconds, and the ratios.
2. The references of the quickstart's KID (base-model samples and their features, target
   features), made with an empty cache folder and again with the folder filled: seconds and ratio.

GPU: not measured here (`--device cuda` runs the same on a GPU when one is present).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def run_job(out: Path, mode: str, steps: int, every: int, device: str, cache: Path) -> dict[str, float]:
    sets = [f"train.steps={steps}", f"eval.every={every}", f"samples.every={2 * every}",
            f"checkpoint.every={steps}", "monitor.early_stop=off", f"eval.mode={mode}",
            f"train.device={device}"]  # fmt: skip
    cmd = [sys.executable, "-m", "dallm", "train", str(QUICKSTART), "--out", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, DALLM_CACHE=str(cache))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_eval: dallm train ({mode}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "eval" / "summary.json").read_text())


def references_seconds(cache: Path, device: str) -> tuple[float, float, int]:
    """Seconds to make the KID references with an empty cache, then with it filled; cache hits."""
    import torch

    from dallm.config import load_config
    from dallm.eval.live import LiveEvaluator
    from dallm.image.models import load_parts

    cfg = load_config(QUICKSTART, [f"train.device={device}"])
    parts = load_parts(cfg.model, device=device)
    os.environ["DALLM_CACHE"] = str(cache)
    times, hits = [], 0
    for n in range(2):
        with tempfile.TemporaryDirectory() as out:
            ev = LiveEvaluator(cfg, parts, Path(out), lambda e: None, torch.device(device), torch.float32, [])
            t0 = time.perf_counter()
            ev.references()
            times.append(time.perf_counter() - t0)
            hits = ev.cache.hits if n == 1 else hits
    return times[0], times[1], hits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold, warm, hits = references_seconds(cache, args.device)
        runs = {mode: run_job(Path(tmp) / mode, mode, args.steps, args.every, args.device, cache)
                for mode in ("inline", "background")}  # fmt: skip
    print(
        f"quickstart cut to {args.steps} steps, KID every {args.every}, samples every {2 * args.every}, {args.device}"
    )
    print(f"{'mode':<12}{'eval_share':>12}{'wall s':>10}{'trainer eval s':>16}{'evaluator s':>13}")
    for mode, s in runs.items():
        trainer = s["eval_share"] * s["wall_seconds"]
        worker = s.get("eval_worker_seconds", trainer)
        print(f"{mode:<12}{s['eval_share']:>12.3f}{s['wall_seconds']:>10.1f}{trainer:>16.1f}{worker:>13.1f}")
    inline, bg = runs["inline"], runs["background"]
    print(f"eval_share inline / background: {inline['eval_share'] / max(bg['eval_share'], 1e-9):.1f}x; "
          f"wall inline / background: {inline['wall_seconds'] / bg['wall_seconds']:.2f}x")  # fmt: skip
    print(f"KID references (base samples + features, target features): cold {cold:.1f} s, warm {warm:.2f} s "
          f"({hits} cache hits): {cold / max(warm, 1e-9):.0f}x")  # fmt: skip
    if args.device == "cpu":
        print("GPU: not measured (no GPU lent)")


if __name__ == "__main__":
    main()

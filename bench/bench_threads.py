"""Worker threads on a busy CPU: the quickstart's training steps beside a CPU hog, with torch using
every core (what a process did before it sized its threads) vs the size dallm.engine.threads chooses.

    .venv/bin/python bench/bench_threads.py [--steps 40] [--hogs 1] [--repeats 2]

Each run is `dallm train configs/quickstart.toml` cut to `--steps` steps with evaluation, samples
and checkpoints off; `--hogs` processes spin on the CPU meanwhile. Steps/s is the median of the
engine's own `steps_per_s` after the first 5 steps; runs alternate, best of each is compared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spin() -> None:
    while True:
        pass


def steps_per_s(out: Path, steps: int, threads: str | None) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DALLM_THREADS")}
    if threads:
        env["DALLM_THREADS"] = threads
    sets = [f"train.steps={steps}", "eval.every=0", "samples.every=0", f"checkpoint.every={steps}",
            "monitor.early_stop=off", "tokens.ti_steps=5"]  # fmt: skip
    cmd = [sys.executable, "-m", "dallm", "train", str(ROOT / "configs/quickstart.toml"), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_threads: dallm train failed: {proc.stderr.strip().splitlines()[-1:]}")
    line = next(
        (x for x in proc.stderr.splitlines() if x.startswith("torch threads:")), "not shown: no terminal"
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r and r.get("step", 0) > 5]
    return statistics.median(rates), line


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--hogs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    results: dict[str, list[float]] = {"every core": [], "sized": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for name, threads in (("every core", str(cores)), ("sized", None)):
                    rate, line = steps_per_s(Path(tmp) / f"{name[0]}{r}", args.steps, threads)
                    results[name].append(rate)
                    print(f"  {name:10s} run {r + 1}: {rate:6.2f} steps/s  [{line}]", flush=True)
    finally:
        for h in hogs:
            h.terminate()
    best = {k: max(v) for k, v in results.items()}
    print(f"{cores} cores, {args.hogs} CPU hog(s), {args.steps} steps, best of {args.repeats}:")
    print(f"  every core ({cores} threads): {best['every core']:.2f} steps/s")
    print(f"  sized by dallm.engine.threads:       {best['sized']:.2f} steps/s")
    print(f"  ratio sized / every core: {best['sized'] / best['every core']:.2f}x")


if __name__ == "__main__":
    main()

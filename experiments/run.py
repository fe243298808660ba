"""Run the study's experiments on the micro world (CPU), as `dallm sweep --local` sweeps, and report.

    python experiments/run.py data                      # 50 train + 100 held-out teacher images
    python experiments/run.py early_stop [--workers 2]  # >= 10 runs: seeds x learning rates
    python experiments/run.py rank                      # lora.rank = 1, 4, 16
    python experiments/run.py early_stop_long           # 600 steps, 2 lr x 5 seeds: policies replayed
    python experiments/run.py size                      # data.limit = 5, 10, 20, 50
    python experiments/run.py full                      # train.method = lora, full
    python experiments/run.py all                       # all, in this order (the priority order)
    python experiments/run.py llm_early_stop            # micro LLM: 5 seeds x 2 lr, ppl_val (issue 17)

Each sweep goes to runs/experiments/<name>/ and its report to runs/experiments/<name>/report/
(`dallm report --sweep`); `early_stop` adds experiments/early_stop.py's analysis. A sweep that is
interrupted continues where it stopped when run again. `--base FOLDER` trains another micro model
than the shipped one; `--scale` multiplies every step count (the CPU budget: see docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.toml"
DATA = ROOT / "runs" / "experiments" / "data"
OUT = ROOT / "runs" / "experiments"

# The quickstart scaled to the CPU budget: fewer steps, a smaller batch, cheaper evaluation
# (20 eval images sampled with 10 DDIM steps), KID every `every` steps, checkpoints at each KID.
STEPS, EVERY = 200, 25
# Sweeps split per learning rate and run side by side (one process and one torch thread each).
PARALLEL_LRS: dict[str, list[str]] = {"early_stop_long": ["1e-3", "3e-3"]}
EXPERIMENTS: dict[str, list[str]] = {
    "early_stop": ["--grid", "train.lr=5e-4,2e-3", "--repeat", "5"],
    "rank": ["--grid", "lora.rank=1,4,16", "--repeat", "2"],
    # The steps experiment and the early-stopping study: recorded once (CS every step, validation
    # KID with its spread every 30 steps), every stopping policy replayed offline from the logs
    # (experiments/early_stop.py). 600 steps at the quickstart's batch 8 and 50 textual-inversion
    # steps; KID every 30 steps lands on every window boundary of M = 30 (5%) and 60 (10%).
    # Run as one sweep per learning rate, side by side, so both have their first seeds early.
    "early_stop_long": ["--repeat", "5", "--set", "train.steps=600", "--set", "train.batch_size=8"]
    + ["--set", "tokens.ti_steps=50", "--set", "eval.every=30", "--set", "samples.every=0"]
    + ["--set", "checkpoint.every=300"],
    "size": ["--grid", "data.limit=5,10,20,50", "--repeat", "2"],
    "full": [
        "--grid",
        "train.method=lora,full",
        "--grid",
        "train.lr=1e-4,1e-3",
        "--set",
        "monitor.early_stop=off",
    ],
}


# The LLM early-stop study (configs/llm-quickstart.toml on 4 teacher training texts, batches of 4,
# so that it overfits within the CPU budget): 200 steps, the turning point recorded (notify) and
# training run to the end, ppl_val every 10 steps (every window boundary of M = 10 (5%) and 20
# (10%)), the detector fed after step 10 (LoRA B starts at 0: CS jumps from 0 in the first steps),
# every policy replayed by early_stop.py. One sweep per learning rate, side by side (one process
# and one torch thread each), so that both learning rates have their first seeds early.
LLM_CONFIG = ROOT / "configs" / "llm-quickstart.toml"
LLM_DATA = OUT / "llm-data"
LLM_SETS = ["train.steps=200", "train.batch_size=4", "monitor.early_stop=notify", "monitor.start_step=10"]
LLM_SETS += ["eval.every=10", "samples.every=0", "checkpoint.every=200", "checkpoint.keep=1"]
LLM_LRS = ["1e-2", "2e-2"]


def llm_early_stop(args: argparse.Namespace) -> None:
    from dallm.micro_llm.data import text_sets, write_text_sets

    files = write_text_sets(LLM_DATA, text_sets(n_train=4, n_val=64, n_base=64, seed=1))
    sets = LLM_SETS + [f"data.{name}={path}" for name, path in files.items()]
    folder = OUT / "llm_early_stop"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0, procs = time.time(), []
    for lr in LLM_LRS:
        out = folder / f"lr{lr}"
        cmd = [sys.executable, "-m", "dallm", "sweep", str(LLM_CONFIG), "--local", "--id", out.name]
        cmd += ["--out", str(out), "--workers", "1", "--repeat", str(args.repeat or 5)]
        cmd += [a for x in [*sets, f"train.lr={lr}"] for a in ("--set", x)]
        print("$", " ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
    rcs = [p.wait() for p in procs]
    print(f"llm_early_stop: sweeps exit {rcs} after {time.time() - t0:.0f} s", flush=True)
    analysis = [sys.executable, str(ROOT / "experiments" / "early_stop.py"), str(folder), "--metric", "ppl"]
    subprocess.call(analysis, cwd=ROOT)


def common(base: str | None, scale: float) -> list[str]:
    steps, every = max(40, round(STEPS * scale)), max(10, round(EVERY * scale))
    sets = [
        f"data.dir={DATA / 'train'}",
        f"eval.val_dir={DATA / 'val'}",
        "data.limit=20",
        f"train.steps={steps}",
        "train.batch_size=4",
        f"tokens.ti_steps={max(5, steps // 12)}",
        "monitor.early_stop=notify",  # record the turning point, train on: the whole curve is kept
        f"checkpoint.every={every}",
        "checkpoint.keep=2",
        f"samples.every={every}",
        "samples.steps=10",
        "samples.seeds=[0]",
        f"eval.every={every}",
        "eval.num_images=50",
        "eval.steps=10",
        "eval.subset_size=25",  # of 50 samples and 100 held-out images: the std over subsets says something
        "eval.num_subsets=100",
    ]
    if base:
        sets += [f"model.base={Path(base).resolve()}", "tokens.init_word=style"]
    return [a for s in sets for a in ("--set", s)]


def make_data() -> None:
    from dallm.micro.build import write_quickstart_data

    if (DATA / "train" / "train049.png").is_file() and (DATA / "val" / "val099.png").is_file():
        print(f"{DATA}: ready")
        return
    write_quickstart_data(DATA, n_train=50, n_val=100, seed=1234)
    print(f"{DATA}: 50 train + 100 held-out teacher images")


def sweep_cmd(name: str, folder: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "dallm", "sweep", str(CONFIG), "--local", "--id", folder.name]
    cmd += ["--out", str(folder)] + common(args.base, args.scale) + EXPERIMENTS[name] + extra
    if args.repeat is not None:  # later --set (and --repeat) wins
        cmd += ["--repeat", str(args.repeat)]
    return cmd


def run(name: str, args: argparse.Namespace) -> None:
    folder = OUT / name
    t0 = time.time()
    if name in PARALLEL_LRS:
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = []
        for lr in PARALLEL_LRS[name]:
            cmd = sweep_cmd(name, folder / f"lr{lr}", args, ["--set", f"train.lr={lr}", "--workers", "1"])
            print("$", " ".join(cmd), flush=True)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
        rcs = [p.wait() for p in procs]
        print(f"{name}: sweeps exit {rcs} after {time.time() - t0:.0f} s", flush=True)
        subprocess.call([sys.executable, str(ROOT / "experiments" / "early_stop.py"), str(folder)], cwd=ROOT)
        return
    cmd = sweep_cmd(name, folder, args, ["--workers", str(args.workers)])
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"{name}: sweep exit {rc} after {time.time() - t0:.0f} s", flush=True)
    subprocess.call([sys.executable, "-m", "dallm", "report", "--sweep", str(folder)], cwd=ROOT)
    if name.startswith("early_stop"):
        subprocess.call([sys.executable, str(ROOT / "experiments" / "early_stop.py"), str(folder)], cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["data", *EXPERIMENTS, "all", "llm_early_stop"])
    p.add_argument("--base", default=None, help="a micro model folder (default: the shipped one)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the step counts (default 1)")
    p.add_argument("--repeat", type=int, default=None, help="seeds per grid point (default: per experiment)")
    args = p.parse_args()
    if args.what == "llm_early_stop":  # text data of its own: no images needed
        llm_early_stop(args)
        return 0
    make_data()
    if args.what == "data":
        return 0
    for name in EXPERIMENTS if args.what == "all" else [args.what]:
        run(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

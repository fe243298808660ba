"""Early stopping on the micro LLM where it overfits (issue 23, item 4's LLM test): record, then replay.

    python experiments/llm_stop.py record --data-seed 1 --seeds 0-5 --lr-scheduler constant [--texts 8]
    python experiments/llm_stop.py replay experiments/data/llm [--tune-seeds 0-1] [--out DIR]
    python experiments/llm_stop.py pack runs/experiments/llm_stop experiments/data/llm

`record` trains `configs/llm-quickstart.toml` with `lora.mlp = true`, rank 8, on `--texts` teacher
texts (`dallm.micro_llm.data.text_sets(n, 64, 64, seed=data_seed)`), batch = all texts, 1,500 steps,
lr 3e-3 (constant or cosine), to the end (`monitor.early_stop = "notify"`): CS every step, ppl_val
with its bootstrap std every `--every` steps. The `data.base` slot carries a FRESH held-out teacher
set instead of base-dialect text: 64 teacher texts of scenes in neither the training nor the
validation set (`fresh_texts`), so `ppl_base` in these logs is the fresh score of the very weights
evaluated at that step, never used for choosing (no winner's curse: choose on ppl_val, report on
ppl_base). `pack` keeps, per run, the config keys that matter and the metric rows
(step, cs, lr, ppl_val(+std), ppl_base(+std) = fresh) as one gzipped JSONL per run.

`replay` (see `replay_main`) runs every policy offline from the packed logs with the engine's own
detector (`dallm.monitor.csf.TurningPointDetector`, fed as `dallm.monitor.early_stop.EarlyStop`
feeds it) and the baselines, and prints the tables of docs/results.md section 7.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "llm-quickstart.toml"
OUT = ROOT / "runs" / "experiments" / "llm_stop"
STEPS, LR = 1500, "3e-3"
FRESH_SEED_OFFSET = 5000  # the fresh set's texts: a corpus seed no other set uses


def fresh_texts(n: int, data_seed: int, exclude: list[str]) -> list[str]:
    """`n` teacher texts of scenes not described in `exclude` (the training and validation texts).

    A teacher text is a function of its scene alone, so distinct texts are distinct scenes."""
    from dallm.micro_llm import world

    seen, out, k = set(exclude), [], 0
    while len(out) < n:
        k += 1
        for t in world.corpus(4 * n * k, "teacher", data_seed + FRESH_SEED_OFFSET):
            if t not in seen:
                seen.add(t)
                out.append(t)
            if len(out) == n:
                break
    return out


def seeds_arg(text: str) -> list[int]:
    """ "0-5" -> [0..5], "3,7" -> [3, 7]."""
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def record(args: argparse.Namespace) -> int:
    from dallm.micro_llm.data import text_sets, write_text_sets, write_texts

    name = f"n{args.texts}-d{args.data_seed}"
    data = OUT / "data" / name
    sets = text_sets(n_train=args.texts, n_val=64, n_base=1, seed=args.data_seed)
    files = write_text_sets(data, sets)
    files["base"] = write_texts(
        data / "fresh.jsonl", fresh_texts(64, args.data_seed, sets.train + sets.validation)
    )
    over = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.texts}",
        f"train.lr={args.lr}",
        f"train.lr_scheduler={args.lr_scheduler}",
        "lora.rank=8",
        "lora.mlp=true",
        "monitor.early_stop=notify",  # record the turning point, train on: the whole curve is kept
        "monitor.start_step=15",
        f"eval.every={args.every}",
        "samples.every=0",
        f"checkpoint.every={args.steps}",
        "checkpoint.keep=1",
    ] + [f"data.{k}={v}" for k, v in files.items()]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    for seed in seeds_arg(args.seeds):
        tag = f"{name}-{args.lr_scheduler}" + ("" if args.lr == LR else f"-lr{args.lr}")
        out = OUT / tag / f"seed{seed}"
        if any(out.glob("*/result.json")):  # finished: a rerun continues with the next seed
            continue
        cmd = [sys.executable, "-m", "dallm", "sweep", str(CONFIG), "--local", "--id", out.name]
        cmd += ["--out", str(out), "--workers", "1", "--repeat", "1"]
        cmd += [a for x in [*over, f"seed={seed}"] for a in ("--set", x)]
        print("$", " ".join(cmd), flush=True)
        t = time.time()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        print(f"{out}: exit {rc} after {time.time() - t:.0f} s", flush=True)
    print(f"record {name}: {time.time() - t0:.0f} s", flush=True)
    return 0


KEEP = ("step", "cs", "lr", "ppl_val", "ppl_val_std", "ppl_base", "ppl_base_std", "ppl_train")


def pack(args: argparse.Namespace) -> int:
    """One gzipped JSONL per finished run: a header line, then the metric rows (fresh = ppl_base)."""
    args.dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for metrics in sorted(args.folder.glob("**/metrics.jsonl")):
        d = metrics.parent
        if not (d / "result.json").is_file():
            continue
        cfg = tomllib.loads((d / "config.toml").read_text())
        tr = cfg["train"]
        head = {
            "run": str(d.relative_to(args.folder)),
            "seed": cfg.get("seed", 0),
            "data_seed": int(str(d.relative_to(args.folder)).split("-d")[1].split("-")[0]),
            "texts": tr["batch_size"],
            "steps": tr["steps"],
            "lr": tr["lr"],
            "lr_scheduler": tr.get("lr_scheduler", "constant"),
            "eval_every": cfg["eval"]["every"],
            "fresh": "ppl_base",
        }
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rows = [{k: r[k] for k in KEEP if k in r} for r in rows if "cs" in r or "ppl_val" in r]
        name = head["run"].replace("/", "_") + ".jsonl.gz"
        body = json.dumps(head) + "\n" + "".join(json.dumps(r) + "\n" for r in rows)
        # mtime 0: packing the same runs again gives the same bytes (no spurious git changes)
        (args.dest / name).write_bytes(gzip.compress(body.encode(), mtime=0))
        n += 1
    print(f"packed {n} runs into {args.dest}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="train runs to the end, logging CS, ppl_val and the fresh ppl")
    r.add_argument("--data-seed", type=int, default=1)
    r.add_argument("--seeds", default="0-5")
    r.add_argument("--texts", type=int, default=8)
    r.add_argument("--steps", type=int, default=STEPS)
    r.add_argument("--lr", default=LR)
    r.add_argument("--lr-scheduler", default="constant")
    r.add_argument("--every", type=int, default=25)
    k = sub.add_parser("pack", help="compress finished runs' metric logs")
    k.add_argument("folder", type=Path)
    k.add_argument("dest", type=Path)
    y = sub.add_parser("replay", help="every policy and baseline from packed logs: the tables")
    y.add_argument("folder", type=Path, help="the packed logs (*.jsonl.gz)")
    y.add_argument("--tune-seeds", default="0-1", help="training seeds the CS policy is chosen on")
    y.add_argument("--tune-setting", default="constant, lr 0.003", help="the setting tuned on")
    y.add_argument("--out", type=Path, default=None, help="also write the tables and runs.csv here")
    args = p.parse_args()
    if args.cmd == "record":
        return record(args)
    if args.cmd == "replay":
        from llm_stop_replay import replay_main

        return replay_main(args)
    return pack(args)


if __name__ == "__main__":
    sys.exit(main())

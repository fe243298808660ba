"""Record early-stopping runs once, score them offline, in two CPU processes (issue 23).

    python experiments/es_record.py plan                  # the runs, in the order they are made
    python experiments/es_record.py record [--only NAME]   # train what is not recorded yet
    python experiments/es_record.py score [--reverse]      # score recorded runs (experiments/es_score.py)
    python experiments/es_record.py both                   # record everything, then score from the end
    python experiments/es_record.py fresh                  # the fresh teacher references (200 images)
    python experiments/es_record.py same_start             # planned 60 vs 120 steps: identical first 60?

A run is the quickstart config (`configs/quickstart.toml`: batch 8, rank 4, 50 textual-inversion steps,
constant lr after 20 warm-up steps) on the first `data.limit` of the 50 teacher images of
`runs/experiments/data/train`, trained to its end with `monitor.early_stop = "notify"` (nothing stops,
the turning point is only logged), CS every step, no live evaluation or sample grids (the scoring is
offline), and a checkpoint (LoRA + new-token weights) every 30 steps, all kept. Runs go to
runs/experiments/es/<group>/<name>/ (not committed; `es_data.py` writes what is committed).

Groups: `tune` (seeds 0-4: defaults are chosen on these) and `test` (seeds 5+: reported only). The
test runs of lr 1e-3, seeds 5-7 are planned at 1,200 steps (the budget-invariance test): their first
600 steps are the 600-step plan, valid because nothing in training reads train.steps with a constant
schedule (`same_start` checks it on 60 vs 120 steps).
Two processes at most, one torch thread each: `record` in one and `score` in the other, or `both`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.toml"
DATA = ROOT / "runs" / "experiments" / "data"
FRESH = ROOT / "runs" / "experiments" / "fresh"
OUT = ROOT / "runs" / "experiments" / "es"
FRESH_SEED, N_FRESH_REFS = 98765, 200
EVERY = 30  # checkpoint interval: every window boundary of M = 30 (5% of 600) and 60 (10%)


@dataclass(frozen=True)
class Plan:
    group: str
    seed: int
    lr: str
    limit: int = 20
    steps: int = 600

    @property
    def name(self) -> str:
        return f"lr{self.lr}-n{self.limit}-s{self.seed}" + (f"-T{self.steps}" if self.steps != 600 else "")

    @property
    def folder(self) -> Path:
        return OUT / self.group / self.name


def plans() -> list[Plan]:
    """In the order they are recorded: the first out-of-sample table needs tune and a first test set."""
    out = [Plan("tune", s, lr) for lr in ("1e-3", "3e-3") for s in range(5)]
    # lr 1e-3, seeds 5-7 planned at 1,200 steps: their first 600 steps are the 600-step test runs
    # (`same_start`), and the whole of them the budget-invariance test. In the order recorded.
    out += [Plan("test", 5, "1e-3", steps=1200), Plan("test", 5, "3e-3")]
    out += [Plan("test", 6, "1e-3", steps=1200), Plan("test", 6, "3e-3"), Plan("test", 8, "1e-3")]
    out += [Plan("test", 7, "1e-3", steps=1200), Plan("test", 7, "3e-3"), Plan("test", 8, "3e-3")]
    out += [Plan("test", s, lr) for s in (9, 10) for lr in ("1e-3", "3e-3")]
    out += [Plan("test", s, lr, limit=10) for s in range(5, 11) for lr in ("1e-3", "3e-3")]
    out += [Plan("test", s, "5e-4") for s in range(5, 11)]
    return out


def record_config(folder: Path) -> Path:
    """The quickstart config without its live evaluation and sample grids (scored offline instead)."""
    text = CONFIG.read_text()
    keep = [part for part in text.split("\n[") if not part.startswith(("samples]", "eval]"))]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.parent / "record.toml"
    path.write_text("\n[".join(keep))
    return path


def train_cmd(p: Plan) -> list[str]:
    sets = [
        f"data.dir={DATA / 'train'}",
        f"data.limit={p.limit}",
        f"seed={p.seed}",
        f"train.lr={p.lr}",
        f"train.steps={p.steps}",
        "monitor.early_stop=notify",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep=100000",
    ]
    cmd = [sys.executable, "-m", "dallm", "train", str(record_config(p.folder)), "--no-progress"]
    return cmd + ["--out", str(p.folder)] + [a for s in sets for a in ("--set", s)]


def env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def record(only: str | None = None, most: int | None = None) -> None:
    for p in plans():
        if (p.folder / "result.json").is_file() or (only and only not in p.name):
            continue
        if most is not None:
            if most <= 0:
                return
            most -= 1
        t0 = time.time()
        rc = subprocess.call(train_cmd(p), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL)
        took = time.time() - t0
        print(f"recorded {p.group}/{p.name}: exit {rc}, {took:.0f} s", flush=True)
        (p.folder / "record_seconds.json").write_text(json.dumps({"seconds": took}))


def score(reverse: bool = False, wait: bool = False, group: str | None = None) -> None:
    """Score every recorded run (a lock file per run: two scorers never take the same run)."""
    while True:
        todo = [
            p for p in plans() if not (p.folder / "scores" / "done").is_file() and group in (None, p.group)
        ]
        if not todo:
            return
        busy = True
        for p in reversed(todo) if reverse else todo:
            if not (p.folder / "result.json").is_file():
                continue
            lock = p.folder / "scores.lock"
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            t0 = time.time()
            # Tune runs: only what choosing needs (defaults are tuned on validation references; the
            # fresh ones are for the test report), every 60 steps past 300; test runs every 60 steps
            # past 240; 1,200-step runs only what choosing needs past step 600 (the CPU budget).
            light = 0 if p.group == "tune" else 600 if p.steps > 600 else None
            cmd = [sys.executable, str(ROOT / "experiments" / "es_score.py"), str(p.folder)]
            cmd += ["--light-after", str(light)] if light is not None else []
            cmd += ["--sparse-after", "300" if p.group == "tune" else "240"]
            cmd += ["--full-steps", "0"] if p.group == "test" and p.seed == 5 else []  # the base, once
            rc = subprocess.call(cmd, cwd=ROOT, env=env())
            if rc == 0:
                (p.folder / "scores" / "done").write_text(json.dumps({"seconds": time.time() - t0}))
            lock.unlink()
            print(f"scored {p.group}/{p.name}: exit {rc}, {time.time() - t0:.0f} s", flush=True)
            busy = False
            break
        if busy:
            if not wait:
                return
            time.sleep(20)


def fresh() -> None:
    from dallm.micro.build import write_quickstart_data

    if (FRESH / "val" / f"val{N_FRESH_REFS - 1:03d}.png").is_file():
        return
    write_quickstart_data(FRESH, n_train=0, n_val=N_FRESH_REFS, seed=FRESH_SEED)
    print(f"{FRESH}: {N_FRESH_REFS} fresh teacher images (seed {FRESH_SEED})")


def same_start() -> int:
    """Planned 60 and 120 steps, same seed: the first 60 steps' loss, CS and lr must be identical."""
    rows = {}
    for steps in (60, 120):
        p = Plan("check", 0, "1e-3", steps=steps)
        if not (p.folder / "result.json").is_file():
            subprocess.check_call(train_cmd(p), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL)
        lines = (p.folder / "metrics.jsonl").read_text().splitlines()
        rows[steps] = {
            r["step"]: (r.get("loss"), r.get("cs"), r.get("lr"))
            for r in map(json.loads, lines)
            if r.get("step", 0) <= 60
        }
    same = rows[60] == rows[120]
    print(f"planned 60 vs 120 steps, seed 0, lr 1e-3: first 60 steps identical (loss, cs, lr): {same}")
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["plan", "record", "score", "both", "fresh", "same_start"])
    ap.add_argument("--only", default=None, help="record runs whose name contains this")
    ap.add_argument("--most", type=int, default=None, help="record at most this many runs")
    ap.add_argument("--reverse", action="store_true", help="score from the end of the plan")
    ap.add_argument("--wait", action="store_true", help="score: wait for runs still being recorded")
    ap.add_argument("--group", default=None, help="score only this group (tune, test)")
    a = ap.parse_args()
    if a.what == "plan":
        for p in plans():
            print(p.group, p.name)
    elif a.what == "record":
        record(a.only, a.most)
    elif a.what == "score":
        score(a.reverse, a.wait, a.group)
    elif a.what == "both":
        record(a.only, a.most)
        score(reverse=True, wait=True, group=a.group)
    elif a.what == "fresh":
        fresh()
    elif a.what == "same_start":
        return same_start()
    return 0


if __name__ == "__main__":
    sys.exit(main())

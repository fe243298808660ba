"""Background evaluation slower than training: how far behind the evaluator gets, and when the held
metrics rows and checkpoints go out (during training, and during the stop's final wait).

    .venv/bin/python bench/eval_backlog.py [--target 0.02] [--max-images 32] [--steps 60] [--every 5]

Trains the shipped micro model on the quickstart data (one torch thread for the trainer, one for the
evaluator process) and prints a timeline: each evaluation asked for (trainer step, how many were
pending after it), each evaluation's values arriving in metrics.jsonl, each checkpoint; then the
largest backlog and how the final wait went. Not a timing benchmark: the figures are counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=None, help="eval.kid_std_target (default: off)")
    ap.add_argument("--max-images", type=int, default=32, help="eval.max_images")
    ap.add_argument("--steps", type=int, default=60, help="train.steps")
    ap.add_argument("--every", type=int, default=5, help="eval.every (samples every 2x)")
    ap.add_argument("--val", type=Path, default=ROOT / "configs/data/quickstart/val", help="eval.val_dir")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from dallm.config import load_config
    from dallm.engine.dispatch import train
    from dallm.eval.background import BackgroundEvaluator
    from dallm.image.trainer import ImageTrainer
    from dallm.protocol import CheckpointEvent, JobEvent, LogEvent, MetricsEvent, PhaseEvent

    overrides = [
        f"train.steps={args.steps}",
        "train.batch_size=2",
        "monitor.early_stop=off",
        f"checkpoint.every={2 * args.every}",
        f"samples.every={2 * args.every}",
        "samples.steps=4",
        f"eval.every={args.every}",
        "eval.num_images=8",
        "eval.subset_size=4",
        "eval.num_subsets=20",
        "eval.steps=4",
        "eval.threads=1",
        "eval.mode=background",
        "eval.cache=false",
        f"eval.val_dir={args.val}",
        f"eval.max_images={args.max_images}",
    ] + ([f"eval.kid_std_target={args.target}"] if args.target is not None else [])
    cfg = load_config(ROOT / "configs/quickstart.toml", overrides)

    t0 = time.perf_counter()
    trainer = ["training", 0]  # the trainer's phase and step
    backlog: list[int] = []
    submit = BackgroundEvaluator.submit

    def counted(self: BackgroundEvaluator, step: int, weights) -> None:  # type: ignore[no-untyped-def]
        submit(self, step, weights)
        backlog.append(len(self._pending))
        print(
            f"{time.perf_counter() - t0:7.1f}s  step {step:4d} asked   pending {self.pending()}", flush=True
        )

    BackgroundEvaluator.submit = counted  # type: ignore[method-assign]
    trainer_step = ImageTrainer.step

    def stepped(self: ImageTrainer, step: int) -> dict[str, float]:
        trainer[1] = step + 1  # the job's step after this optimizer step
        return trainer_step(self, step)

    ImageTrainer.step = stepped  # type: ignore[method-assign]

    def emit(e: JobEvent) -> None:
        at = f"{time.perf_counter() - t0:7.1f}s"
        if isinstance(e, PhaseEvent) and e.phase == "stopping":
            trainer[0] = "stopping"
        elif isinstance(e, MetricsEvent) and "kid_val" in e.values:
            n = int(e.values.get("eval_num_images", 0))
            print(
                f"{at}  step {e.step:4d} KID in its row ({n} images), trainer {trainer[0]} at step {trainer[1]}"
            )
        elif isinstance(e, CheckpointEvent):
            print(f"{at}  step {e.step:4d} checkpoint written, trainer {trainer[0]} at step {trainer[1]}")
        elif isinstance(e, LogEvent):
            print(f"{at}  log: {e.message}")

    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, out_dir=Path(tmp) / "job", emit=emit)
        rows = (Path(tmp) / "job" / "metrics.jsonl").read_text().count("\n")
    print(
        f"done in {time.perf_counter() - t0:.0f}s: {result.reason} at step {result.final_step}, {rows} rows; "
        f"largest backlog {max(backlog, default=0)} evaluations (after each request: {backlog})"
    )


if __name__ == "__main__":
    sys.exit(main())

"""A background evaluator slower than training: the job's waits release rows and checkpoints as each
evaluation comes back, not only after the last one (`dallm.engine.job.Job._wait_upto`, `dallm.engine.late_results`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from engine_helpers import job as engine_job
from engine_helpers import metrics
from test_evaluation import FakeExtractor

from dallm.eval.interface import Arrived, Weights
from dallm.eval.live import LiveEvaluator
from dallm.protocol import JobEvent, LogEvent
from dallm.protocol.files import checkpoint_folders


class BehindEvaluator(LiveEvaluator):
    """Evaluates like the inline evaluator but hands nothing back until the job waits, and then only
    what it waits for: a background evaluator whose backlog grows while training goes on. Records,
    at each wait, the steps already in metrics.jsonl and the checkpoints already written."""

    def __init__(self, *args: Any, free: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.free = free  # how many of the first evaluations come back without a wait
        self.backlog: list[Arrived] = []
        self.waits: list[tuple[int, list[int], list[int]]] = []

    def submit(self, step: int, weights: Weights) -> None:
        super().submit(step, weights)
        self.backlog += self._arrived
        self._arrived = []

    def pending(self) -> list[int]:
        return [a.step for a in self.backlog]

    def collect(self, wait_upto: int | None = None) -> list[Arrived]:
        if wait_upto is not None:
            rows = (
                [r["step"] for r in metrics(self.out_dir)]
                if (self.out_dir / "metrics.jsonl").exists()
                else []
            )
            ckpts = [s for s, _ in checkpoint_folders(self.out_dir / "checkpoints")]
            self.waits.append((wait_upto, rows, ckpts))
            self._arrived = [a for a in self.backlog if a.step <= wait_upto]
            self.backlog = [a for a in self.backlog if a.step > wait_upto]
        elif self.free and self.backlog:
            self.free -= 1
            self._arrived, self.backlog = self.backlog[:1], self.backlog[1:]
        return super().collect()


def _job(
    tiny_sd: Path, image_dir: Callable[..., Path], out: Path, steps: int, free: int = 0
) -> tuple[Any, list]:
    """A job on the tiny model with KID every 2 steps by a `BehindEvaluator`, run to its end."""
    from dallm.engine.job import Job
    from dallm.image.data import load_training_data
    from dallm.image.models import load_parts
    from dallm.image.trainer import ImageTrainer
    from dallm.monitor.early_stop import NoEarlyStop

    data = image_dir(n=4, captions=True, name="train")
    cfg = engine_job(
        tiny_sd,
        data,
        train={"steps": steps},
        checkpoint={"every": 4},
        eval={"every": 2, "num_images": 4, "steps": 2, "num_subsets": 5},
    )
    parts = load_parts(cfg.model)
    images, _ = load_training_data(cfg.data, 16)
    trainer = ImageTrainer(cfg, parts, images, None, torch.device("cpu"))
    events: list[JobEvent] = []
    ev = BehindEvaluator(cfg, parts, out, events.append, torch.device("cpu"), torch.float32,
                         images.captions, extractor=FakeExtractor(), free=free)  # fmt: skip
    job = Job(cfg, trainer, NoEarlyStop(), ev, out, events.append, None)
    try:
        job.run(None)
    finally:
        job.log.close()
    return ev, events


def _behind(events: list) -> list[str]:
    return [
        e.message for e in events if isinstance(e, LogEvent) and "evaluations behind training" in e.message
    ]


def test_a_stop_with_a_backlog_writes_each_evaluations_rows_as_it_comes_back(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "job"
    ev, events = _job(tiny_sd, image_dir, out, steps=8)
    # Training never saw an evaluation come back: the stop at step 8 waits for 2, 4, 6 and 8, and
    # before each wait, the rows and checkpoints before that step are out already.
    assert [(upto, rows, ckpts) for upto, rows, ckpts in ev.waits] == [
        (2, [1], []),
        (4, [1, 2, 3], []),
        (6, [1, 2, 3, 4, 5], [4]),
        (8, [1, 2, 3, 4, 5, 6, 7], [4]),
    ]
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    assert [r["step"] for r in metrics(out) if "kid_train" in r] == [2, 4, 6, 8]
    assert [s for s, _ in checkpoint_folders(out / "checkpoints")] == [4, 8]
    assert _behind(events) == []  # nothing came back during training: the start-up may be slow


def test_an_evaluator_falling_behind_is_said_once(
    tiny_sd: Path, image_dir: Callable[..., Path], tmp_path: Path
) -> None:
    # Step 2's evaluation comes back at once, then none: 4, 6, 8 pending at step 8, and more later.
    _, events = _job(tiny_sd, image_dir, tmp_path / "job", steps=12, free=1)
    said = _behind(events)
    assert len(said) == 1 and "3 evaluations behind" in said[0] and "[4, 6, 8]" in said[0], said

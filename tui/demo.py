"""Deterministic fake jobs for tests, snapshots, the benchmark and `dallm-tui --demo`."""

from __future__ import annotations

import io
import math
import threading

from PIL import Image, ImageDraw

from dallm.config import JobConfig, config_to_dict
from dallm.protocol import (
    TERMINAL_STATES,
    CheckpointEvent,
    FinishedEvent,
    GpuUsage,
    HostUsage,
    JobEvent,
    JobSummary,
    JobUsage,
    LogEvent,
    MetricsEvent,
    ProgressEvent,
    ResourcesReply,
    RolledBackEvent,
    SampleEvent,
    StartedEvent,
    TurningPointEvent,
    UsageEvent,
)
from dallm.testing.fake_daemon import FakeConnection

COLORS = [(220, 60, 60), (60, 170, 80), (70, 90, 220), (230, 200, 40), (200, 80, 200), (60, 200, 210)]


DEMO_PROMPTS = ["a red circle", "a blue square"]
DEMO_SEEDS = [0, 1]


def sample_png(step: int, size: int = 24) -> bytes:
    """A prompts x seeds grid (1-pixel white pad, as the engine's thumbnails) of simple shapes whose
    colours drift with `step` (something that changes)."""
    rows, cols = len(DEMO_PROMPTS), len(DEMO_SEEDS)
    image = Image.new("RGB", (cols * (size + 1) + 1, rows * (size + 1) + 1), "white")
    draw = ImageDraw.Draw(image)
    for i in range(rows * cols):
        r_, c_ = divmod(i, cols)
        c = COLORS[(i + step // 100) % len(COLORS)]
        bg = COLORS[(i + 3) % len(COLORS)]
        x, y = 1 + c_ * (size + 1), 1 + r_ * (size + 1)
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=tuple(v // 3 for v in bg))
        r = 5 + (step // 50 + i) % 5
        mid_x, mid_y = x + size // 2, y + size // 2
        shape = draw.ellipse if r_ == 0 else draw.rectangle
        shape((mid_x - r, mid_y - r, mid_x + r, mid_y + r), fill=c)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_event(step: int, base: bool = False) -> SampleEvent:
    path = "samples/base.png" if base else f"samples/step-{step:06d}.png"
    png = sample_png(step)
    return SampleEvent(step=step, path=path, png=png, prompts=DEMO_PROMPTS, seeds=DEMO_SEEDS, base=base)


def metrics_at(step: int, total: int, phase: float = 0.0) -> dict[str, float]:
    """Smooth, deterministic curves shaped like a real run: falling loss, rising CS, two valleys."""
    x = step / max(total, 1)
    values = {
        "loss": 0.08 + 0.25 * math.exp(-4 * x) + 0.01 * math.sin(step * 0.7 + phase),
        "lr": 1e-4,
        "cs": 0.02 + 0.3 * (1 - math.exp(-3 * x)),
        # A real run's scale: 6e-5 falling to ~1e-8, with two valleys (log axis by default).
        "cs_fluct": 6e-5
        * math.exp(-5 * x)
        * (1.03 + math.cos(2 * math.pi * 2.2 * x + phase) + 0.02 * math.sin(step * 1.3)),
        "steps_per_s": 4.0,
    }
    return values


def kid_at(step: int, total: int) -> dict[str, float]:
    x = step / max(total, 1)
    return {
        "kid_train": 0.09 * math.exp(-3 * x) + 0.004,
        "kid_val": 0.09 * math.exp(-2.5 * x) + 0.012 + 0.03 * max(0.0, x - 0.6) ** 2,
        "kid_base": 0.01 + 0.08 * (1 - math.exp(-2 * x)),
        "kid_val_std": 0.004 + 0.02 * math.exp(-2 * x),  # the std of the validation KID's mean
        # the repeatable validation loss, and prompt fidelity falling as the LoRA overfits
        "val_loss": 0.12 + 0.2 * math.exp(-3 * x) + 0.02 * max(0.0, x - 0.6),
        "fidelity": 0.97 - 0.3 * max(0.0, x - 0.4),
        "base_fidelity": 0.97,
    }


def job_events(
    step_to: int,
    total: int,
    *,
    start: int = 0,
    phase: float = 0.0,
    eval_every: int = 50,
    ckpt_every: int = 100,
    tp: int | None = None,
    samples: bool = True,
) -> list[JobEvent]:
    """The events of a job from `start` (exclusive) to `step_to` (inclusive)."""
    out: list[JobEvent] = []
    if start == 0:
        out.append(StartedEvent(start_step=0, total_steps=total, device="cpu", trainable_params=811_008))
        if samples:
            out.append(sample_event(0, base=True))
    for step in range(start + 1, step_to + 1):
        values = metrics_at(step, total, phase)
        if step % eval_every == 0:
            values |= kid_at(step, total)
        out.append(MetricsEvent(step=step, values=values))
        if step % 10 == 0 or step == step_to:  # the trainer's step, loss and lr, as an engine says them
            keep = ("loss", "lr", "steps_per_s", "cs")
            out.append(ProgressEvent(step=step, values={k: values[k] for k in keep}))
        if samples and step % eval_every == 0:
            out.append(sample_event(step))
        if step % ckpt_every == 0:
            out.append(CheckpointEvent(step=step, path=f"checkpoints/step-{step}"))
            out.append(LogEvent(message=f"step {step}: loss {values['loss']:.4f}"))
        if tp is not None and step == tp + 3:
            out.append(TurningPointEvent(step=tp, seen_at=step))
    return out


FAILED_LOG = """\
torch threads: 2 (slot of 2 cores)
step 100: loss 0.1432
Traceback (most recent call last):
  File "dallm/daemon/worker.py", line 182, in run
    result = runner(
  File "dallm/engine/job.py", line 611, in train
    loss = step_fn(batch)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (demo)
"""


def demo_config(name: str, total: int) -> dict:
    """A valid job config for a demo job (what `d` shows and `C` clones)."""
    cfg = {"name": name, "data": {"dir": f"/data/{name.split('-')[0]}"}, "train": {"steps": total}}
    return config_to_dict(JobConfig.model_validate(cfg))


def demo_connection(points: int = 400, jobs: int = 4) -> FakeConnection:
    """A daemon with a running job (turning point found), a finished one, a failed one, a queued one,
    and further running jobs when `jobs` > 4."""
    conn = FakeConnection(endpoint="demo://fake-daemon")
    total = 1000
    specs = [
        (1, "quickstart-r4", "running", points, int(points * 0.6)),
        (2, "sweep-r16-n20", "finished", total, 620),
        (3, "sweep-r1-n5", "failed", 137, None),
        (4, "teacher-style-50", "queued", 0, None),
    ]
    for i in range(4, jobs):
        specs.append((i + 1, f"bulk-{i + 1}", "running", points, None))
    for job_id, name, state, steps, tp in specs[:jobs]:
        row = JobSummary(id=job_id, name=name, state="queued", total_steps=total, priority=0)
        conn.add_job(row, config=demo_config(name, total))
        if steps:
            conn.write_worker_log(job_id, "torch threads: 2 (slot of 2 cores)\n")
            conn.emit(job_id, *job_events(steps, total, tp=tp, phase=job_id * 0.3), live=False)
        if state == "finished":
            conn.set_state(job_id, "finished", "completed", live=False)
        elif state == "failed":
            conn.write_worker_log(job_id, FAILED_LOG.split("\n", 1)[1])
            conn.emit(job_id, LogEvent(level="error", message="CUDA out of memory at step 137"), live=False)
            conn.set_state(job_id, "failed", "oom: CUDA out of memory at step 137", live=False)
        elif state == "running":
            conn.set_state(job_id, "running", live=False)
    return conn


class DemoRunner:
    """Advances the running demo jobs by one step every `interval` seconds (for `--demo`)."""

    def __init__(self, conn: FakeConnection, interval: float = 0.1) -> None:
        self.conn, self.interval = conn, interval
        self._seen = 0
        self._stop = threading.Event()

    def _obey(self) -> None:
        """Play the daemon's part for the actions sent so far (stop, cancel, checkpoint, rollback)."""
        while self._seen < len(self.conn.sent):
            action = self.conn.sent[self._seen]
            self._seen += 1
            row = self.conn.summary(action.job)
            if action.kind == "rollback" and action.step is not None:
                self._rollback(row, action.step, action.resume)
                continue
            if row.state != "running":
                continue
            if action.kind == "stop":
                result = row.turning_point if row.turning_point is not None else row.step
                self.conn.emit(
                    action.job, FinishedEvent(reason="stopped", final_step=row.step, result_step=result)
                )
                self.conn.set_state(action.job, "stopped", f"stopped at step {row.step}")
            elif action.kind == "cancel":
                self.conn.set_state(action.job, "cancelled", "cancelled by the user")
            elif action.kind == "checkpoint":
                path = f"checkpoints/step-{row.step}"
                self.conn.emit(action.job, CheckpointEvent(step=row.step, path=path))

    def _rollback(self, row: JobSummary, step: int, resume: bool) -> None:
        """As the daemon does: a running job rolls back in place; an ended one runs again from the
        checkpoint (resume) or only writes the result of `step` (finish there)."""
        if row.state not in ("running", *TERMINAL_STATES):
            return
        if row.state != "running":
            self.conn.set_state(row.id, "stopping" if not resume else "running", f"rollback to step {step}")
        self.conn.emit(row.id, RolledBackEvent(step=step, resume=resume))
        if not resume:
            self.conn.emit(row.id, FinishedEvent(reason="rolled_back", final_step=row.step, result_step=step))
            self.conn.set_state(row.id, "stopped", f"rolled back to step {step}")

    def _advance(self, job: int) -> None:
        row = self.conn.summary(job)
        if row.step >= row.total_steps:
            final = FinishedEvent(reason="completed", final_step=row.step, result_step=row.step)
            self.conn.emit(job, final)
            self.conn.set_state(job, "finished", f"completed {row.step} steps")
            return
        tp = int(row.total_steps * 0.35) if row.turning_point is None else None
        events = job_events(row.step + 1, row.total_steps, start=row.step, tp=tp, phase=0.3)
        self.conn.emit(job, *events)

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self._obey()
            for job in self.conn.job_ids():
                if self.conn.summary(job).state == "running":
                    self._advance(job)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True, name="dallm-demo")
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


def script_gpu_machine(conn: FakeConnection, t: float, live: bool = True) -> None:
    """A resources sample for the screenshots and the snapshot test: the demo's fake daemon has no
    machine of its own to sample, so this is scripted as a GPU machine reports it (host, one GPU,
    job 1's worker at time `t`; job 2's peak memory)."""
    conn.usage = ResourcesReply(
        t=t,
        host=HostUsage(cpu_percent=37.5, cpu_count=16, mem_used_mb=50000.0, mem_total_mb=131072.0),
        gpus=[
            GpuUsage(
                index=0, name="NVIDIA H200", util_percent=93.0, mem_used_mb=61440.0, mem_total_mb=143771.0
            )
        ],  # fmt: skip
        jobs=[
            JobUsage(job=1, pid=4242, device="cuda:0", cpu_percent=99.0, rss_mb=3200.0, gpu_mem_mb=60000.0)
        ],
    )
    conn.emit(2, UsageEvent(peak_rss_mb=2900.0, peak_gpu_mb=52000.0), live=live)

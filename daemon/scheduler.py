"""Device slots and worker processes: which queued job runs next, starting workers, noticing when
they end, and what state a job goes to when its worker has ended (`outcome`).

Priorities first (higher runs sooner), then FIFO by id. One worker process per slot: a slot is a
CUDA device index (the worker sees only that device, CUDA_VISIBLE_DEVICES) or "cpu" (no CUDA).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from dallm.daemon.executors.local import LocalExecutor
from dallm.daemon.executors.spec import Executor, Handle, WorkerSpec
from dallm.daemon.identity import TOKEN_ENV, new_token
from dallm.daemon.packing import MemoryOf, PeakBook, device_memory, fits, read_peak, shape_key
from dallm.protocol import FinishedEvent, JobCommand, JobResult, WorkerError

log = logging.getLogger("dallm.daemon")
EXIT_GRACE_S = 0.3  # after a worker exits, wait this long for its last messages before judging it


@dataclass
class WorkerProc:
    job: int
    attempt: int
    slot: int
    device: str
    proc: Handle
    identity: bytes
    token: str = ""  # $DALLM_WORKER_TOKEN of the process (daemon/identity.py)
    out: Path | None = None
    shape: str = ""  # packing.shape_key of its config
    need: int | None = None  # its recorded peak GPU memory (bytes), None when unknown
    started: float = field(default_factory=time.time)
    hello: bool = False
    pending: list[JobCommand] = field(default_factory=list)
    finished: FinishedEvent | None = None
    done: JobResult | None = None
    error: WorkerError | None = None
    last_step: int = 0
    cancel: bool = False
    exited_at: float | None = None
    kill_deadline: float | None = None


class Scheduler:
    """Slots and their workers; the executor starts and signals them (daemon/executors/)."""

    def __init__(
        self,
        slots: list[str],
        endpoint: str,
        runner: str | None,
        executor: Executor | None = None,
        peaks: PeakBook | None = None,
        memory: MemoryOf = device_memory,
    ) -> None:
        from dallm.engine.threads import usable_cores

        self.slot_cores = max(1, usable_cores() // len(slots))  # each worker's share of the CPU
        self.slots: list[WorkerProc | None] = [None] * len(slots)
        self.devices = slots
        self.executor: Executor = executor or LocalExecutor()
        self.endpoint = self.executor.endpoint(endpoint)
        self.runner = runner
        self.peaks = peaks
        self.memory = memory
        self.by_job: dict[int, WorkerProc] = {}
        self.by_identity: dict[bytes, WorkerProc] = {}
        self.refused: dict[int, str] = {}  # job -> why it was not packed (logged once)

    def free_slot(self) -> int | None:
        for i, w in enumerate(self.slots):
            if w is None:
                return i
        return None

    def slot_for(self, job: int, config: dict) -> int | None:
        """A free slot for `job`: on an idle device first; on a GPU other jobs use only when its peak
        memory fits beside theirs (daemon/packing.py). None: it waits."""
        free = [i for i, w in enumerate(self.slots) if w is None]
        if not free:
            return None
        busy = {w.device for w in self.slots if w is not None}
        idle = [i for i in free if self._device(i) not in busy or self.devices[i] in ("cpu", "ray")]
        if idle:
            return idle[0]
        need = self.peaks.get(shape_key(config)) if self.peaks else None
        why = ""
        for i in free:
            others = [w.need for w in self.slots if w is not None and w.device == self._device(i)]
            ok, why = fits(need, others, self.memory(self.devices[i]))
            if ok:
                log.info("job %s: %s on %s", job, why, self._device(i))
                return i
        if self.refused.get(job) != why:
            self.refused[job] = why
            log.info("job %s waits for a GPU of its own: %s", job, why)
        return None

    def _device(self, slot: int) -> str:
        d = self.devices[slot]
        return d if d in ("cpu", "ray") else f"cuda:{d}"

    def start(
        self,
        job: int,
        attempt: int,
        config_path: Path,
        out_dir: Path,
        resume: Path | None,
        log: Path,
        slot: int | None = None,
        config: dict | None = None,
    ) -> WorkerProc:
        slot = self.free_slot() if slot is None else slot
        assert slot is not None and self.slots[slot] is None
        token = new_token()
        spec = WorkerSpec(job=job, attempt=attempt, device=self.devices[slot], endpoint=self.endpoint,
                          config=config_path, out=out_dir, resume=resume, log=log, runner=self.runner,
                          slot_cores=self.slot_cores, env={TOKEN_ENV: token})  # fmt: skip
        handle = self.executor.start(spec)  # TOKEN_ENV lets a restarted daemon tell it from a reused pid
        shape = shape_key(config) if config is not None else ""
        w = WorkerProc(job, attempt, slot, self._device(slot), handle, f"{job}.{attempt}".encode(),
                       token=token, out=out_dir, shape=shape,
                       need=self.peaks.get(shape) if self.peaks and shape else None)  # fmt: skip
        self.refused.pop(job, None)
        self.slots[slot] = w
        self.by_job[job] = w
        self.by_identity[w.identity] = w
        return w

    def ended(self, now: float) -> list[WorkerProc]:
        """Workers that exited at least EXIT_GRACE_S ago (their last messages are in by then)."""
        out = []
        for w in list(self.by_job.values()):
            if w.exited_at is None and w.proc.poll() is not None:
                w.exited_at = now
            if w.kill_deadline is not None and w.exited_at is None and now > w.kill_deadline:
                self.kill(w, signal.SIGKILL)
            if w.exited_at is not None and now - w.exited_at >= EXIT_GRACE_S:
                out.append(w)
        return out

    def release(self, w: WorkerProc) -> None:
        self.slots[w.slot] = None
        self.by_job.pop(w.job, None)
        self.by_identity.pop(w.identity, None)
        self.executor.release(w.identity)
        if self.peaks is not None and w.out is not None and w.shape:
            peak = read_peak(w.out)
            if peak is not None:
                self.peaks.record(w.shape, peak, w.job)

    def kill(self, w: WorkerProc, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        w.proc.signal(sig)
        if sig != signal.SIGKILL and w.kill_deadline is None:
            w.kill_deadline = time.time() + grace

    def close(self) -> None:
        self.executor.close()
        if self.peaks is not None:
            self.peaks.close()


def signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def result_outcome(done: JobResult, shutting_down: bool) -> tuple[str, str, bool]:
    """(state, reason, resume) for a job whose engine returned `done` (also read back from a
    result.json by daemon/reconcile.py)."""
    r = done.reason
    if r == "interrupted":
        why = "daemon stopped" if shutting_down else "interrupted"
        return "queued", f"{why} at step {done.final_step}; resumes from its checkpoint", True
    if r == "completed":
        return "finished", f"completed {done.final_step} steps", False
    if r == "early_stop":
        tp = done.turning_point
        result = "result: its weights" if tp == done.result_step else f"result: step {done.result_step}"
        at = f" at step {tp}" if tp is not None else ""
        return (
            "stopped-early",
            f"early stop at step {done.final_step} (turning point{at}); {result}",
            False,
        )
    if r == "stopped":
        return (
            "stopped",
            f"stopped at step {done.final_step}; result is step {done.result_step}",
            False,
        )
    if r == "rolled_back":
        return "stopped", f"rolled back to step {done.result_step}", False
    return "finished", f"finished ({r}) at step {done.final_step}", False


def outcome(w: WorkerProc, shutting_down: bool, retries: int) -> tuple[str, str, bool]:
    """(state, reason, resume) for a job whose worker ended."""
    if w.cancel:
        return "cancelled", "cancelled by user", False
    if w.done is not None:
        return result_outcome(w.done, shutting_down)
    if w.error is not None:
        return "failed", w.error.message, False
    if w.proc.error:
        return "failed", w.proc.error, False
    if w.proc.lost:  # its machine went away: not the job's fault, so no retry is used up
        return "queued", f"{w.proc.lost} at step {w.last_step}; resumes from its checkpoint elsewhere", True
    how = signal_name(w.proc.returncode)
    if shutting_down:
        return "queued", f"daemon stopped ({how} at step {w.last_step}); resumes from its checkpoint", True
    if w.attempt <= retries:
        return (
            "queued",
            f"worker died ({how}) at step {w.last_step}; retry {w.attempt}/{retries} from its checkpoint",
            True,
        )
    return "failed", f"worker died ({how}) at step {w.last_step}", False

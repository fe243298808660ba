"""A worker process: runs the training engine for one job and talks to the daemon over one DEALER
socket (events up, commands down). It is independent of how it was started: all it needs is the
daemon's worker endpoint, the job id/attempt, the config (JSON file) and the output folder.

    python -m dallm.daemon.worker --endpoint ipc://... --job 3 --attempt 1 --config cfg.json --out DIR
                                  [--resume PATH] [--runner dallm.engine.dispatch:train] [--parent PID]

The engine is `--runner` (default $DALLM_JOB_RUNNER, else dallm.engine.dispatch:train), an `Engine`
(`dallm.protocol.Engine`: the signature of `dallm.engine.dispatch.train`). The worker dies with the daemon (PR_SET_PDEATHSIG), so a
killed daemon never leaves an orphan training that a restarted daemon would collide with.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import importlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import zmq

from dallm.protocol import (
    MAX_WORKER_BYTES,
    WORKER_EVENT,
    WORKER_MESSAGE,
    Engine,
    FinishedEvent,
    JobCommand,
    JobEvent,
    JobResult,
    MetricsEvent,
    ProgressEvent,
    SampleEvent,
    StartedEvent,
    UsageEvent,
    WorkerDone,
    WorkerError,
    WorkerHello,
    WorkerMessage,
    job_command_adapter,
    training_line,
)

DEFAULT_RUNNER = "dallm.engine.dispatch:train"
USAGE_EVERY_S = 5.0  # how often the worker reports its peak memory (with the engine's events)
# Set by an executor that starts the worker on another machine (daemon/executors/ray.py): the CURVE
# keys of its link (Z85: the daemon's public key, this job's public and secret key), and where it
# runs ("node 10.0.0.3 GPU 1"), which the engine's "started" event carries as part of its device.
CURVE_ENVS = ("DALLM_WORKER_SERVER_KEY", "DALLM_WORKER_PUBLIC_KEY", "DALLM_WORKER_SECRET_KEY")
PLACEMENT_ENV = "DALLM_PLACEMENT"
_MORE = int(zmq.SNDMORE)


def load_runner(spec: str) -> Engine:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "train")


def _die_with_parent(parent: int | None) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(3)  # the daemon died before we could ask to follow it


def classify(exc: BaseException) -> WorkerError:
    """One clear line for the job's reason: CUDA OOM, NaN loss, full disk, or the error itself."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".strip()
    tb = "".join(traceback.format_exception(exc))
    for item in chain:
        if type(item).__name__ == "OutOfMemoryError" or "out of memory" in str(item).lower():
            return WorkerError(category="oom", message=f"CUDA out of memory: {text}", traceback=tb)
        full = "no space left on device" in str(item).lower() or "disk quota exceeded" in str(item).lower()
        if full or (isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT)):
            return WorkerError(category="disk_full", message=f"disk full: {text}", traceback=tb)
    lowered = text.lower()
    if (
        isinstance(exc, FloatingPointError)
        or " nan" in lowered
        or "nan " in lowered
        or "non-finite" in lowered
    ):
        return WorkerError(category="nan", message=f"NaN loss: {text}", traceback=tb)
    return WorkerError(category="error", message=text, traceback=tb)


def peak_usage() -> UsageEvent:
    """This process's peak memory so far: resident (the kernel's high-water mark) and, when torch
    has touched a GPU, torch's peak allocation (what an OOM is about)."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu_mb = None
    torch = sys.modules.get("torch")  # never import torch only to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    return UsageEvent(peak_rss_mb=round(rss_mb, 1), peak_gpu_mb=None if gpu_mb is None else round(gpu_mb, 1))


class WorkerLink:
    """The worker end of the daemon link: `emit` and `poll` as the engine wants them."""

    def __init__(self, endpoint: str, job: int, attempt: int) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"{job}.{attempt}".encode())
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_BYTES)
        self.sock.setsockopt(zmq.LINGER, 30_000)
        keys = [os.environ.get(name, "") for name in CURVE_ENVS]
        if all(keys):
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = (
                k.encode() for k in keys
            )
        self.placement = os.environ.get(PLACEMENT_ENV, "")
        self.sock.connect(endpoint)
        self.lock = threading.Lock()
        self.pending: collections.deque[JobCommand] = collections.deque()
        self.usage_at = 0.0  # when the peak memory was last reported
        self.total_steps = 0
        self.send(WorkerHello(job=job, attempt=attempt, pid=os.getpid()))

    def send(self, message: WorkerMessage) -> None:
        with self.lock:
            self.sock.send_multipart([WORKER_MESSAGE, message.model_dump_json().encode()])

    def emit(self, event: JobEvent) -> None:
        if type(event) is FinishedEvent:
            self.report_usage()  # the final peak, before the job's last event
        if type(event) is MetricsEvent and not all(map(math.isfinite, event.values.values())):
            # JSON has no NaN/inf: keep the step, leave out the values that are not numbers.
            event = MetricsEvent(
                step=event.step, values={k: v for k, v in event.values.items() if math.isfinite(v)}
            )
        if type(event) is ProgressEvent:
            values = {k: v for k, v in event.values.items() if math.isfinite(v)}
            event = event.model_copy(update={"values": values})
            # the worker log reads like a trainer's console: one line per progress report
            print(training_line(event.step, self.total_steps, values, event.backlog), flush=True)
        if type(event) is StartedEvent:
            self.total_steps = event.total_steps
        if self.placement and type(event) is StartedEvent:
            event = event.model_copy(update={"device": f"{event.device} @ {self.placement}"})
        t = repr(time.time()).encode()
        png = event.png if isinstance(event, SampleEvent) else b""
        body = event.model_dump_json(exclude={"png"}) if png else event.model_dump_json()
        with self.lock:
            send = self.sock.send
            send(WORKER_EVENT, _MORE)
            send(t, _MORE)
            if png:
                send(body.encode(), _MORE)
                send(png, 0, copy=False)
            else:
                send(body.encode(), 0)
        if type(event) is not UsageEvent and time.monotonic() - self.usage_at >= USAGE_EVERY_S:
            self.report_usage()

    def report_usage(self) -> None:
        self.usage_at = time.monotonic()
        self.emit(peak_usage())

    def poll(self) -> JobCommand | None:
        with self.lock:
            while True:
                try:
                    frame = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.pending.append(job_command_adapter.validate_json(frame))
                except ValueError:
                    continue
        return self.pending.popleft() if self.pending else None

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def run(args: argparse.Namespace) -> int:
    _die_with_parent(args.parent)
    link = WorkerLink(args.endpoint, args.job, args.attempt)
    code = 0
    try:
        from dallm.config import config_from_dict
        from dallm.daemon.packing import write_peak
        from dallm.engine.threads import set_torch_threads

        print(set_torch_threads(args.slot_cores), flush=True)  # to the job's log

        cfg = config_from_dict(json.loads(Path(args.config).read_text()), source=f"job {args.job}")
        runner = load_runner(args.runner)
        result = runner(
            cfg,
            out_dir=Path(args.out),
            resume=Path(args.resume) if args.resume else None,
            emit=link.emit,
            poll=link.poll,
        )
        if not isinstance(result, JobResult):
            raise TypeError(f"the engine {args.runner} returned {type(result).__name__}, not a JobResult")
        write_peak(Path(args.out))  # what packing needs to know of jobs of this shape
        link.send(WorkerDone(result=result))
    except BaseException as e:  # noqa: BLE001 - everything is reported to the daemon
        err = classify(e)
        with contextlib.suppress(Exception):
            link.report_usage()
        link.send(err)  # first: the log below may be on a full disk
        with contextlib.suppress(OSError):
            print(err.traceback, file=sys.stderr, flush=True)
        code = 1
    finally:
        link.close()
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dallm-worker")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--job", type=int, required=True)
    p.add_argument("--attempt", type=int, default=1)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume")
    p.add_argument("--runner", default=os.environ.get("DALLM_JOB_RUNNER", DEFAULT_RUNNER))
    p.add_argument("--parent", type=int, help="die with this process (the daemon, or the Ray task)")
    p.add_argument("--slot-cores", type=int, help="CPU cores of this worker's slot (default: all)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

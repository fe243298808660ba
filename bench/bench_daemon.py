"""Daemon benchmark: event throughput, thumbnail latency, and step time under the daemon vs without.

    .venv/bin/python bench/bench_daemon.py [--events 100000] [--steps 40] [--skip-step-time]

1. Metric events/s taken in, stored (SQLite, one transaction per batch) and published: a fake job
   emits `--events` MetricsEvents as fast as it can; a subscriber times the span from the job's
   StartedEvent to its FinishedEvent (both published in order around every metric event) and the
   store is checked to hold them all. Target: >= 20,000/s. Also reported: events per CPU second of
   the daemon process (its capacity with a core of its own; the fake worker and the subscriber
   compete for the same cores here).
2. Thumbnail latency: a fake job sends a ~28 KB PNG every step; latency = subscriber receive time
   minus the worker's emit time (same clock). Median and p95.
3. Step time: the same tiny-model config trained by `dallm.engine.dispatch.train` in a plain process (what
   `dallm train` runs) and by a daemon worker; per-step wall time from the emit times of the
   MetricsEvents (median over steps after the first 5), runs alternated (`--repeats`), best of each
   compared. Target: within 2%.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from dallm.client.client import DaemonClient, DaemonError
from dallm.protocol import MetricsEvent, SampleEvent, StartedEvent, decode_envelope, job_topic


def start_daemon(home: Path, runner: str | None, **env: str) -> subprocess.Popen:
    e = dict(os.environ) | env
    if runner:
        e["DALLM_JOB_RUNNER"] = runner
    else:
        e.pop("DALLM_JOB_RUNNER", None)
    cmd = [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(home)]
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if DaemonClient(home=home, timeout=0.5).ping().pid == proc.pid:
                return proc
        except DaemonError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("daemon did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: events per daemon CPU second is the daemon's capacity on
    a core of its own, whatever else the machine is doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@functools.cache
def fake_data() -> str:
    """One valid image: the fake engine reads no data, but the daemon's preflight refuses a job
    without usable images."""
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="dallm-bench-data-"))
    atexit.register(shutil.rmtree, folder, True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "a.png")
    return str(folder)


def fake_config(name: str, steps: int, **extra: dict) -> dict:
    cfg = {"name": name, "data": {"dir": fake_data(), "instance_prompt": "a red circle"},
           "train": {"steps": steps}, "monitor": {"window": 2}, "checkpoint": {"every": steps}}  # fmt: skip
    return cfg | extra


def subscriber(c: DaemonClient, topic: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect(c.events_endpoint)
    time.sleep(0.3)  # slow joiner
    return sub


def bench_throughput(home: Path, n_events: int) -> dict:
    per_step = 1000
    steps = max(1, n_events // per_step)
    proc = start_daemon(home, "dallm.testing.fake_engine:train", DALLM_FAKE_STEP_S="0")
    try:
        with DaemonClient(home=home) as c:
            sub = subscriber(c, job_topic(1))
            cpu0 = cpu_seconds(proc.pid)
            job = c.submit(fake_config(f"tput-blast.{per_step}", steps))
            t_start = t_last = None
            received = 0
            finished = False
            while not finished:  # until FinishedEvent, or 2 s of silence (it was dropped at the HWM)
                if not sub.poll(60_000 if t_start is None else 2_000):
                    break
                frames = sub.recv_multipart()
                t_last = time.perf_counter()
                received += 1
                if t_start is None and b'"kind":"started"' in frames[1]:
                    t_start = t_last
                finished = b'"kind":"finished"' in frames[1]
            cpu = cpu_seconds(proc.pid) - cpu0
            if t_start is None or t_last is None:
                raise RuntimeError("no events")
            t_end = t_last
            assert c.wait(job.id, timeout=60).state == "finished"
            events, _ = c.history_all(0, [job_topic(job.id)], kinds=["metrics"], include_png=False)
            stored = len(events)
            sub.close()
        assert t_start is not None
        rate = (steps * per_step) / (t_end - t_start)
        return {"metric_events": steps * per_step, "stored": stored, "received_by_subscriber": received - 2,
                "seconds": round(t_end - t_start, 3), "events_per_s": round(rate),
                "daemon_cpu_s": round(cpu, 3), "events_per_daemon_cpu_s": round(steps * per_step / cpu)}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def bench_thumbnails(home: Path, n: int = 60) -> dict:
    proc = start_daemon(home, "dallm.testing.fake_engine:train", DALLM_FAKE_STEP_S="0.05")
    try:
        with DaemonClient(home=home) as c:
            sub = subscriber(c, "job/")
            c.submit(fake_config("thumbs-png.96", n, samples={"every": 1, "prompts": ["p"]}))
            lat, size = [], 0
            while len(lat) < n:
                if not sub.poll(60_000):
                    raise RuntimeError("no thumbnails")
                frames = sub.recv_multipart()
                now = time.time()
                if len(frames) > 2:
                    env = decode_envelope(frames)
                    if isinstance(env.event, SampleEvent):
                        lat.append((now - env.t) * 1000)
                        size = len(env.event.png)
            sub.close()
        lat.sort()
        return {"thumbnails": n, "png_bytes": size, "median_ms": round(statistics.median(lat), 2),
                "p95_ms": round(lat[int(0.95 * (n - 1))], 2), "max_ms": round(lat[-1], 2)}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


PLAIN = """
import json, sys, time
from pathlib import Path
from dallm.config import config_from_dict
from dallm.protocol import MetricsEvent
from dallm.engine.dispatch import train
cfg = config_from_dict(json.loads(sys.argv[1]))
times = []
train(cfg, out_dir=Path(sys.argv[2]), emit=lambda e: times.append(time.time()) if isinstance(e, MetricsEvent) else None)
print(json.dumps(times))
"""


def step_times(times: list[float], skip: int = 5) -> float:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)][skip:]
    return statistics.median(gaps)


def bench_step_time(root: Path, steps: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from dallm.image.tiny import build_tiny_sd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_images

    model = build_tiny_sd(root / "model")
    images = write_images(root / "images", 4)
    cfg = {"name": "steptime", "model": {"base": str(model)}, "data": {"dir": str(images), "instance_prompt": "a red circle"},
           "train": {"steps": steps, "device": "cpu"}, "monitor": {"window": 5, "early_stop": "off"},
           "checkpoint": {"every": steps}}  # fmt: skip
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    plain: list[float] = []
    daemon: list[float] = []
    proc = start_daemon(root / "home", None, OMP_NUM_THREADS="1")
    try:
        with DaemonClient(home=root / "home") as c:
            for i in range(repeats):  # alternate, so that a busy moment of the machine hits both
                out = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(cfg), str(root / f"plain{i}")],
                                     env=env, capture_output=True, text=True, check=True)  # fmt: skip
                plain.append(step_times(json.loads(out.stdout.strip().splitlines()[-1])))
                job = c.submit(cfg)
                s = c.wait(job.id, timeout=600)
                assert s.state == "finished", s.reason
                events, _ = c.history_all(0, [job_topic(job.id)], kinds=["metrics", "started"])
                assert any(isinstance(e.event, StartedEvent) for e in events)
                daemon.append(step_times([e.t for e in events if isinstance(e.event, MetricsEvent)]))
    finally:
        proc.terminate()
        proc.wait(60)
    best_plain, best_daemon = min(plain), min(daemon)
    return {"steps": steps, "runs": repeats, "plain_step_ms": [round(x * 1000, 2) for x in plain],
            "daemon_step_ms": [round(x * 1000, 2) for x in daemon],
            "overhead_pct_best": round(100 * (best_daemon - best_plain) / best_plain, 2)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="step-time runs of each kind, alternated")
    p.add_argument("--skip-step-time", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="db", dir="/tmp"))  # short: IPC paths are limited
    try:
        results = {"throughput": bench_throughput(root / "t", args.events)}
        print(json.dumps(results["throughput"]), flush=True)
        results["thumbnails"] = bench_thumbnails(root / "s")
        print(json.dumps(results["thumbnails"]), flush=True)
        if not args.skip_step_time:
            results["step_time"] = bench_step_time(root, args.steps, args.repeats)
            print(json.dumps(results["step_time"]), flush=True)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

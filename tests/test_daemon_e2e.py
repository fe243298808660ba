# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The daemon with the real training engine on the tiny SD model: a job with live thumbnails
through a graceful daemon restart that resumes it, and a full disk during a checkpoint. (Most
daemon tests use the fake engine; these two check the real one keeps the same contract.)"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import daemons, home, metric_steps, wait_state, wait_step  # noqa: F401

from dallm.cli import main as dallm_main
from dallm.protocol import (
    QUEUE_TOPIC,
    TERMINAL_STATES,
    SampleEvent,
    StartedEvent,
    job_topic,
)


def real_config(model: Path, images: Path, name: str = "real", steps: int = 6, **sections: Any) -> dict:
    cfg: dict[str, Any] = {
        "name": name,
        "model": {"base": str(model)},
        "data": {"dir": str(images), "instance_prompt": "a red circle"},
        "train": {"steps": steps, "device": "cpu", "lr": 1e-3},
        "monitor": {"window": 2, "early_stop": "off"},
        "checkpoint": {"every": 3, "keep": None},
    }
    for key, value in sections.items():
        cfg[key] = value if not isinstance(value, dict) else {**cfg.get(key, {}), **value}
    return cfg


def follow_until(sub, job: int, done: Callable[[list], bool], timeout: float = 120.0) -> list:
    seen: list = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        env = sub.get(timeout=1.0)
        if env is not None and env.job == job:
            seen.append(env)
            if done(seen):
                return seen
    raise AssertionError(f"job {job}: condition not met; saw {[e.event.kind for e in seen][-10:]}")


def test_real_job_live_then_graceful_restart_resumes(daemons, tiny_sd: Path, image_dir) -> None:
    """Thumbnails arrive live; `dallm-daemon stop` checkpoints the running job; the next daemon
    resumes it; metrics continue without duplicates; `stop` finishes it with its weights."""
    cfg = real_config(tiny_sd, image_dir(), steps=4000, samples={"every": 3, "prompts": ["a red circle"], "steps": 2},
                      checkpoint={"every": 1000})  # fmt: skip
    d = daemons(runner=None, OMP_NUM_THREADS="1")
    with d.client() as c:
        job = c.submit(cfg)
        with c.subscribe([QUEUE_TOPIC, job_topic(job.id)], since=0) as sub:
            seen = follow_until(
                sub, job.id, lambda s: isinstance(s[-1].event, SampleEvent) and s[-1].event.step >= 3
            )
        assert seen[-1].event.png.startswith(b"\x89PNG")
        assert any(isinstance(e.event, StartedEvent) and e.event.device == "cpu" for e in seen)
    assert d.stop(timeout=120) == 0  # the job checkpoints first (InterruptCommand)
    d2 = daemons(runner=None, OMP_NUM_THREADS="1")
    with d2.client() as c:
        detail = c.show(job.id)
        assert any("daemon stopped" in t.reason for t in detail.transitions)
        stopped_at = max(k.step for k in detail.checkpoints)
        assert stopped_at >= 3
        wait_step(c, job.id, stopped_at + 2, timeout=120)
        c.stop(job.id)
        s = wait_state(c, job.id, TERMINAL_STATES, timeout=120)
        assert s.state == "stopped", s.reason
        assert "resuming" in c.show(job.id).transitions[-3].reason
        steps = metric_steps(c, job.id)
        assert steps == list(range(1, len(steps) + 1)) and stopped_at < steps[-1] < 4000
        assert (Path(s.out_dir) / "pytorch_lora_weights.safetensors").exists()
        assert [k.step for k in c.show(job.id).checkpoints if not k.superseded][0] == stopped_at
    # `dallm export JOB` finds the job's output folder through the daemon
    kohya = d2.home / "export" / "real.safetensors"
    argv = ["export", str(job.id), "--home", str(d2.home), "--format", "kohya", "--out", str(kohya)]
    assert dallm_main(argv) == 0 and kohya.stat().st_size > 0
    assert (
        dallm_main(
            ["export", "no-such-job", "--home", str(d2.home), "--format", "kohya", "--out", str(kohya)]
        )
        == 1
    )


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="dfull", dir="/tmp"))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if ok.returncode != 0:
        shutil.rmtree(mnt, ignore_errors=True)
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    shutil.rmtree(mnt, ignore_errors=True)


def test_real_full_disk_during_checkpoint(daemons, tiny_sd: Path, image_dir, small_disk: Path) -> None:
    d = daemons(runner=None, OMP_NUM_THREADS="1")
    out = small_disk / "out"
    with d.client() as c:
        job = c.submit(
            real_config(tiny_sd, image_dir(), steps=400, output_dir=str(out), checkpoint={"every": 2})
        )
        wait_step(c, job.id, 3, timeout=90)
        filler = small_disk / "filler"
        with open(filler, "wb") as f:  # fill the disk: the next checkpoint cannot be written
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        s = wait_state(c, job.id, TERMINAL_STATES, timeout=90)
        assert s.state == "failed" and s.reason.startswith("disk full"), s.reason
        kept = [k for k in c.show(job.id).checkpoints if (out / k.path).is_dir()]
        assert kept, "no checkpoint survived"
        filler.unlink()
        from dallm.engine.checkpoint import load_checkpoint

        assert load_checkpoint(out / kept[-1].path).step == kept[-1].step  # intact and loadable
        assert c.ping().pid  # the daemon serves on

# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The daemon with the real training engine on the tiny SD model: a job end to end with live
thumbnails, a graceful daemon restart that resumes it, and a full disk during a checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import daemons, home, metric_steps, wait_state, wait_step  # noqa: F401

from dallm.protocol import (
    QUEUE_TOPIC,
    TERMINAL_STATES,
    CheckpointEvent,
    JobStateEvent,
    SampleEvent,
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


def test_real_job_end_to_end_with_thumbnails(daemons, tiny_sd: Path, image_dir) -> None:
    d = daemons(runner=None)
    cfg = real_config(tiny_sd, image_dir(), samples={"every": 3, "prompts": ["a red circle"], "steps": 2})
    with d.client() as c:
        job = c.submit(cfg)
        seen = []
        with c.subscribe([QUEUE_TOPIC, job_topic(job.id)], since=0) as sub:
            for env in sub:
                seen.append(env.event)
                ev = env.event
                if isinstance(ev, JobStateEvent) and ev.job.id == job.id and ev.job.state in TERMINAL_STATES:
                    break
        s = c.summary(job.id)
        assert s.state == "finished", s.reason
        assert metric_steps(c, job.id) == [1, 2, 3, 4, 5, 6]
        samples = [e for e in seen if isinstance(e, SampleEvent)]
        assert samples and all(e.png.startswith(b"\x89PNG") for e in samples)
        assert [e.step for e in seen if isinstance(e, CheckpointEvent)] == [3, 6]
        assert (Path(s.out_dir) / "pytorch_lora_weights.safetensors").exists()
        assert s.device == "cpu" and s.total_steps == 6


def test_real_job_resumes_after_graceful_daemon_stop(daemons, tiny_sd: Path, image_dir) -> None:
    d = daemons(runner=None)
    with d.client() as c:
        job = c.submit(real_config(tiny_sd, image_dir(), steps=400, checkpoint={"every": 1000}))
        wait_step(c, job.id, 4, timeout=90)
    assert d.stop(timeout=90) == 0  # the job checkpoints first (InterruptCommand)
    d2 = daemons(runner=None)
    with d2.client() as c:
        detail = c.show(job.id)
        assert any("daemon stopped" in t.reason for t in detail.transitions)
        stopped_at = max(k.step for k in detail.checkpoints)
        assert stopped_at >= 4
        wait_step(c, job.id, stopped_at + 2, timeout=90)
        c.stop(job.id)
        s = wait_state(c, job.id, TERMINAL_STATES, timeout=90)
        assert s.state == "stopped-early", s.reason
        steps = metric_steps(c, job.id)
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] > stopped_at


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
    d = daemons(runner=None)
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
        from dallm.checkpoint import load_checkpoint

        assert load_checkpoint(out / kept[-1].path).step == kept[-1].step  # intact and loadable
        assert c.ping().pid  # the daemon serves on

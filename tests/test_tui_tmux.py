# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""End to end as a person sees it: a real daemon runs the micro quickstart, `dallm-tui` runs in a
tmux pane, and the screen (tmux capture-pane) shows the job, its charts moving and a thumbnail;
`s` then `y` stops the job and the daemon reports it stopped-early."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_helpers import daemons, home, wait_state  # noqa: F401

from dallm.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
    pytest.mark.xdist_group("tui-daemon"),
]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen_until(session: str, predicate: Callable[[str], bool], timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = tmux("capture-pane", "-p", "-t", session)
        if predicate(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"screen never matched; last screen:\n{text}")


def shown_step(text: str, job: int) -> int:
    m = re.search(rf"^\s*{job}\s+quickstart\s+\S+\s+(\d+)/\d+", text, re.M)
    return int(m.group(1)) if m else -1


def test_tui_in_tmux_on_the_micro_quickstart(home: Path, daemons) -> None:
    cfg = load_config(
        REPO / "configs" / "quickstart.toml",
        # window 10: CS-Fluctuation within ~80 steps (the default, 5% of 2000 steps, would take ~350)
        ["monitor.early_stop=notify", "monitor.window=10", "samples.every=20", "eval.every=100"]
        + ["train.steps=2000"],
    )
    d = daemons(runner=None, OMP_NUM_THREADS="1")
    job = d.client().submit(config_to_dict(cfg), config_dir=REPO / "configs")  # what `dallm submit` sends
    session = f"dallm-test-{job.id}-{int(time.time())}"
    tui = f"{sys.executable} -m dallm.tui.app --home {home} --images halfblock"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", tui)
    try:
        text = screen_until(session, lambda t: "running" in t and shown_step(t, job.id) > 0)
        assert "CS-Fluctuation" in text and "KID" in text
        first = shown_step(text, job.id)
        # the step moves on screen, CS-Fluctuation gets drawn (braille dots) and a thumbnail arrives
        text = screen_until(
            session,
            lambda t: shown_step(t, job.id) > first + 20 and "cs_fluct" in t and "latest)" in t,
            timeout=180,
        )
        assert "▀" in text  # the half-block thumbnail
        assert re.search(r"\b(training|sampling|checkpointing) \d+s\b", text)  # the phase and its time
        tmux("send-keys", "-t", session, "s")
        screen_until(session, lambda t: f"Stop job {job.id} (quickstart) now?" in t, timeout=15)
        tmux("send-keys", "-t", session, "y")
        text = screen_until(session, lambda t: "stopped-early" in t, timeout=120)
        assert wait_state(d.client(), job.id, "stopped-early").state == "stopped-early"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""End to end as a person sees it: a real daemon runs the micro quickstart, `dallm-tui` runs in a
tmux pane, and the screen (tmux capture-pane) shows the job, its charts moving and a thumbnail;
`s` then `y` stops the job: the daemon reports it `stopped` (the user stopped it, not the monitor)
and clears its phase."""

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
    # at the pane's size (160x48): pytest's COLUMNS/LINES (80x24) would win in Textual, and there
    # the thumbnail gives way to the hint to open the gallery
    tui = f"env -u COLUMNS -u LINES {sys.executable} -m dallm.tui.app --home {home} --images halfblock"
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
        # the phase and its time (42s, 3m07s: with background evaluation training runs for minutes)
        assert re.search(r"\b(training|sampling|kid|checkpointing) (\d+m)?\d+s\b", text)
        tmux("send-keys", "-t", session, "s")
        screen_until(session, lambda t: f"Stop job {job.id} (quickstart) now?" in t, timeout=15)
        tmux("send-keys", "-t", session, "y")
        text = screen_until(session, lambda t: re.search(r"\bstopped\b(?!-)", t) is not None, timeout=120)
        ended = wait_state(d.client(), job.id, "stopped")
        assert ended.state == "stopped" and ended.phase == "" and ended.phase_since is None
        assert "stopped-early" not in text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def press_until(session: str, keys: list[str], predicate: Callable[[str], bool], tries: int = 4) -> str:
    """Send `keys` until the screen shows their effect: a key that reaches the app while it is
    still starting up (Textual's terminal queries) can be lost."""
    for _ in range(tries):
        tmux("send-keys", "-t", session, *keys)
        try:
            return screen_until(session, predicate, timeout=5)
        except AssertionError:
            continue
    return screen_until(session, predicate, timeout=5)


def test_tui_in_tmux_compare_and_a_failing_jobs_traceback(home: Path, daemons) -> None:
    """The views on a real daemon (fake engine): two jobs compared (their KID and loss curves
    overlaid, a legend naming both, their config differences), and the log tail of a job that failed shows the worker's traceback."""
    from daemon_helpers import config

    d = daemons(step_s=0.01)
    c = d.client()
    a = c.submit(config("cmp-a", steps=40, every=20, eval={"every": 10}))
    b = c.submit(config("cmp-b", steps=40, every=20, eval={"every": 10}, train={"lr": 0.003}))
    boom = c.submit(config("boom-nan.5", steps=20, every=10))
    for job in (a, b):
        assert wait_state(c, job.id, "finished").state == "finished"
    assert wait_state(c, boom.id, "failed").state == "failed"
    session = f"dallm-views-{boom.id}-{int(time.time())}"
    tui = f"{sys.executable} -m dallm.tui.app --home {home} --images none"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", tui)
    try:
        # the failed job is selected first and its history (the traceback in the event log) loaded
        screen_until(session, lambda t: "cmp-a" in t and "FloatingPointError" in t, timeout=60)

        # One key at a time, each once its effect shows: a key sent right behind an arrow key's
        # escape sequence was seen to be lost. The queue is in run order: ended jobs newest first
        # (boom, cmp-b, cmp-a), the cursor on boom; the header line names the selected job.
        def on(job: int, name: str) -> Callable[[str], bool]:
            return lambda t: re.search(rf"^ {job} {name}\s+(finished|failed)", t, re.M) is not None

        press_until(session, ["Down"], on(b.id, "cmp-b"))
        press_until(session, ["Space"], lambda t: t.count("● cmp-") == 1)
        press_until(session, ["Down"], on(a.id, "cmp-a"))
        press_until(session, ["Space"], lambda t: t.count("● cmp-") == 2)
        press_until(session, ["v"], lambda t: "Comparing 2 jobs" in t)
        text = screen_until(session, lambda t: "KID (val)" in t and f"{a.id} cmp-a" in t, timeout=30)
        kid_legend = next(line for line in text.splitlines() if "KID (val)" in line)
        assert f"{b.id} cmp-b" in kid_legend and f"{a.id} cmp-a" in kid_legend
        # their losses, and what differs between their configs (the lr)
        text = screen_until(session, lambda t: re.search(r"train\.lr\s+0\.003 \| 0\.0001", t) is not None)
        assert re.search(r"^\s*loss\b.*cmp-", text, re.M) is not None, text
        press_until(session, ["Escape"], lambda t: "Comparing" not in t)
        press_until(session, ["Up"], on(b.id, "cmp-b"))
        press_until(session, ["Up"], on(boom.id, "boom-nan.5"))
        press_until(session, ["l"], lambda t: f"worker log of job {boom.id}" in t)
        text = screen_until(session, lambda t: "FloatingPointError: loss is NaN at step 5" in t, timeout=30)
        assert f"worker log of job {boom.id} (boom-nan.5)" in text
        assert "Traceback (most recent call last):" in text
        # the training lines a trainer's console prints (ProgressEvent, about once a second)
        assert re.search(r"step\s+1/20\s+loss \d\.\d{4}\s+lr 1\.0e-04", text) is not None, text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        c.close()


def test_tui_in_tmux_checkpoint_now_then_rollback_and_resume(home: Path, daemons) -> None:
    """`c` makes the running job write a checkpoint now (none is scheduled), and `r` on it, answered
    with `r`, rolls the job back to that step and resumes it: on a real daemon (fake engine)."""
    from daemon_helpers import config, wait_step

    from dallm.protocol import job_topic

    d = daemons(step_s=0.02)
    c = d.client()
    job = c.submit(config("ctl", steps=100_000, every=100_000))  # no scheduled checkpoint
    session = f"dallm-ctl-{job.id}-{int(time.time())}"
    tui = f"{sys.executable} -m dallm.tui.app --home {home} --images none"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", tui)

    def step_on_screen(t: str) -> int:
        m = re.search(rf"^\s*{job.id}\s+ctl\s+\S+\s+(\d+)/\d+", t, re.M)
        return int(m.group(1)) if m else -1

    try:
        screen_until(session, lambda t: step_on_screen(t) > 20, timeout=60)
        assert c.show(str(job.id)).checkpoints == []
        press_until(session, ["c"], lambda t: re.search(r"checkpoint at step \d+", t) is not None)
        text = screen_until(session, lambda t: re.search(r"step\s+\d+\s+KID", t) is not None, timeout=30)
        saved = [ck.step for ck in c.show(str(job.id)).checkpoints]
        assert len(saved) == 1 and f"checkpoint at step {saved[0]}" in text
        wait_step(c, job.id, saved[0] + 100)  # the job runs on past it
        tmux("send-keys", "-t", session, "Tab")  # from the queue to the checkpoint list
        screen_until(session, lambda t: step_on_screen(t) > saved[0] + 100, timeout=10)
        press_until(session, ["r"], lambda t: f"back to step {saved[0]}" in t)
        tmux("send-keys", "-t", session, "r")  # resume from it
        text = screen_until(session, lambda t: f"rolled back to step {saved[0]}" in t, timeout=30)
        rolled = c.summary(job.id)
        assert rolled.state == "running"
        events, _ = c.history_all(topics=[job_topic(job.id)], kinds=["rolled_back"])
        assert [(e.event.step, e.event.resume) for e in events] == [(saved[0], True)]
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        c.cancel(job.id)
        c.close()


def test_tui_in_tmux_shows_the_evaluation_phase(home: Path, daemons) -> None:
    """While an evaluation runs the step counter stands still and the screen says why: the job's
    phase goes from training to kid (with its time) and back, on the micro model.
    Inline evaluation: in the background the trainer would not stop for it."""
    from dallm.protocol import PhaseEvent, job_topic

    cfg = load_config(
        REPO / "configs" / "quickstart.toml",
        ["eval.mode=inline", "eval.every=10", "train.steps=400", "monitor.early_stop=off"]
        + [
            "samples.every=0",
            "checkpoint.every=1000",
            "eval.num_images=10",
            "eval.subset_size=5",
            "eval.steps=5",
        ],
    )
    d = daemons(runner=None, OMP_NUM_THREADS="1")
    c = d.client()
    job = c.submit(config_to_dict(cfg), config_dir=REPO / "configs")
    session = f"dallm-phase-{job.id}-{int(time.time())}"
    tui = f"{sys.executable} -m dallm.tui.app --home {home} --images none"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", tui)
    evaluating = re.compile(r"running · kid (\d+m)?\d+s")
    try:
        text = screen_until(session, lambda t: evaluating.search(t) is not None and shown_step(t, job.id) > 0)
        at = shown_step(text, job.id)  # the step before the evaluated one: its metrics follow the KID
        text = screen_until(
            session,
            lambda t: re.search(r"running · training \d+s", t) is not None and shown_step(t, job.id) > at,
        )
        events, _ = c.history_all(topics=[job_topic(job.id)], kinds=["phase"])
        phases = [e.event.phase for e in events if isinstance(e.event, PhaseEvent)]
        assert {"training", "kid"} <= set(phases)  # no grids (samples.every=0): no "sampling"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        c.cancel(job.id)
        c.close()


def test_tui_in_tmux_rollback_clears_the_erased_cs_fluctuation(home: Path, daemons) -> None:
    """A rollback erases the CS-Fluctuation logged after its step, also the values that lag and are
    drawn at earlier steps (issue 14 broken 1): the open TUI's legend then reads the value logged at
    the rollback step, not the newest erased one. Fake engine (CS-Fluctuation lags 3 windows)."""
    from daemon_helpers import config, metric_steps

    from dallm.testing.fake_engine import cs_fluct_at
    from dallm.tui.chart import format_number

    d = daemons(step_s=0.02)
    c = d.client()
    job = c.submit(config("csf", steps=100_000, every=60, monitor={"window": 10, "early_stop": "off"}))
    session = f"dallm-csf-{job.id}-{int(time.time())}"
    tui = f"{sys.executable} -m dallm.tui.app --home {home} --images none"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", tui)

    def legend(t: str) -> str | None:
        m = re.search(r"━ cs_fluct (\S+)", t)
        return m.group(1) if m else None

    try:
        text = screen_until(session, lambda t: re.search(r"step\s+120\s+KID", t) is not None, timeout=60)
        assert legend(text) is not None
        tmux("send-keys", "-t", session, "Tab")  # to the checkpoint list
        for _ in range(4):  # End: its oldest checkpoint, step 60 (a key can be lost: look at the dialog)
            tmux("send-keys", "-t", session, "End")
            time.sleep(0.5)
            text = press_until(session, ["r"], lambda t: re.search(r"back to step \d+", t) is not None)
            if "back to step 60" in text:
                break
            press_until(session, ["Escape"], lambda t: "back to step" not in t)
        assert "back to step 60" in text, text
        tmux("send-keys", "-t", session, "f")  # finish there
        text = screen_until(session, lambda t: "rolled back to step 60" in t, timeout=30)
        assert wait_state(c, job.id, "stopped").result_step == 60  # the user's doing: not stopped-early
        last = max(metric_steps(c, job.id, include_superseded=True))
        assert last >= 120 and max(metric_steps(c, job.id)) == 60  # it erased values logged at 61..
        kept = format_number(cs_fluct_at(60))
        # the newest erased value differs from the kept one (the fake's values rise with the step)
        assert format_number(cs_fluct_at(last - last % 10)) != kept
        text = screen_until(session, lambda t: legend(t) == kept, timeout=15)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        c.close()

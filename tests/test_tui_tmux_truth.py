# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The dashboard tells the truth, in tmux against a real daemon (fake engine, issue 24): the
checkpoint list is the daemon's (`checkpoint.keep` deletions gone, a rollback after the end works),
the turning point without a checkpoint shows as not kept; the ETA ends at the step early stopping
named; the thumbnail fills its pane, or says to open the gallery where it cannot."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_state  # noqa: F401
from test_tui_tmux import press_until, screen_until, tmux

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
    pytest.mark.xdist_group("tui-daemon"),
]


def seconds(text: str) -> int:
    """format_seconds read back: 42s, 3m07s, 1h05m."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert m is not None and text, text
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return 3600 * h + 60 * mi + s


@pytest.fixture
def tui(home: Path) -> Iterator:
    """tui(name, width, height, images) -> the tmux session running dallm-tui on `home`."""
    sessions: list[str] = []

    def start(name: str, width: int, height: int, images: str = "none") -> str:
        session = f"dallm-{name}-{int(time.time() * 1000)}"
        # without COLUMNS/LINES, which pytest sets (80x24): Textual would take them over the pane's size
        cmd = f"env -u COLUMNS -u LINES {sys.executable} -m dallm.tui.app --home {home} --images {images}"
        tmux("new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), cmd)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_checkpoint_list_is_the_daemons_after_the_end(daemons, tui) -> None:
    """checkpoint.keep = 2 deletes all but the last two: the ended job's list offers those two
    only, the turning point (step 6, never a checkpoint step) shows as not kept with why, and `r`
    on an offered one rolls back; the job ends `stopped` (the user's doing, not early stopping)."""
    d = daemons(step_s=0.01)
    c = d.client()
    job = c.submit(config("keep-tp.6", steps=40, every=5, checkpoint={"keep": 2})).id
    assert wait_state(c, job, "finished").state == "finished"
    assert [k.step for k in c.show(str(job)).checkpoints if not k.superseded] == [35, 40]
    session = tui("keep", 140, 40)
    listed = re.compile(r"step\s+(\d+)\s+KID")
    text = screen_until(session, lambda t: "not kept" in t and len(listed.findall(t)) >= 2, timeout=60)
    assert sorted(map(int, listed.findall(text))) == [35, 40], text
    assert "★ TP 6 not kept" in text and "checkpoint.every" in text, text
    tmux("send-keys", "-t", session, "Tab")  # to the checkpoint list, on its newest (40)
    for _ in range(4):  # ↓ to 35 (a key can be lost: look at the dialog)
        tmux("send-keys", "-t", session, "Down")
        time.sleep(0.5)
        text = press_until(session, ["r"], lambda t: re.search(r"back to step \d+", t) is not None)
        if "back to step 35" in text:
            break
        press_until(session, ["Escape"], lambda t: "back to step" not in t)
    assert "back to step 35" in text, text
    tmux("send-keys", "-t", session, "f")  # finish there
    s = wait_state(c, job, "stopped", timeout=60)
    assert s.result_step == 35 and s.phase == ""
    c.close()


def test_eta_ends_at_the_stop_early_stopping_named(daemons, tui) -> None:
    """The turning point at step 20 says the job stops at step 200 (of 4000): the queue's ETA
    counts to step 200, not to 4000; the job indeed ends there."""
    d = daemons(step_s=0.02)
    c = d.client()
    job = c.submit(config("eta-tp.20-stopat.200", steps=4000, every=1000)).id
    session = tui("eta", 160, 40)
    row = re.compile(rf"^\s*{job}\s+eta\S*\s+running\b.*?✓ 20\s+(\S+)", re.M)
    text = screen_until(session, lambda t: row.search(t) is not None and row.search(t).group(1) != "-")
    eta = seconds(row.search(text).group(1))
    # ~175 steps left at ~40/s; counted to 4000 it would be 3800 steps at most 50/s: over a minute
    assert eta < 40, text
    assert wait_state(c, job, "stopped-early", timeout=60).step == 200
    c.close()


def halfblock_box(text: str) -> tuple[int, int]:
    """(widest run of half-blocks on a line, lines holding one): the thumbnail's size on screen."""
    runs = [max((len(r) for r in re.findall("▀+", line)), default=0) for line in text.splitlines()]
    return max(runs, default=0), sum(1 for r in runs if r)


def test_thumbnail_fills_its_pane_or_points_to_the_gallery(daemons, tui) -> None:
    """A 32x32 sample: at 200x50 drawn at least 30 columns wide (half-blocks; 8 before), at 80x24 either
    readable (10x5 cells or more) or replaced by the hint to open the gallery."""
    d = daemons(step_s=0.01)
    c = d.client()
    job = c.submit(
        config("thumb-png.32", steps=30, every=100, samples={"every": 10, "prompts": ["a red circle"]})
    )
    assert wait_state(c, job.id, "finished").state == "finished"
    wide = tui("wide", 200, 50, images="halfblock")
    text = screen_until(wide, lambda t: halfblock_box(t)[0] >= 30, timeout=60)
    width, lines = halfblock_box(text)
    assert lines >= 10, text
    small = tui("small", 80, 24, images="halfblock")

    def judged(t: str) -> bool:
        width, lines = halfblock_box(t)
        return "g opens the gallery" in t or (width >= 10 and lines >= 5)

    screen_until(small, lambda t: "thumb" in t and judged(t), timeout=60)
    c.close()

"""The TUI's pure parts: chart downsampling, image encoders and terminal detection, the event model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dallm.protocol import (
    CheckpointEvent,
    EventEnvelope,
    JobState,
    JobStateEvent,
    JobSummary,
    MetricsEvent,
    RolledBackEvent,
    TurningPointEvent,
    job_topic,
)
from dallm.tui import images
from dallm.tui.chart import column_spans
from dallm.tui.model import Model, Series, eta_seconds, format_eta


def env(seq: int, event, superseded: bool = False) -> EventEnvelope:
    """An event of job 1 as the daemon publishes it."""
    return EventEnvelope(seq=seq, topic=job_topic(1), job=1, t=0.0, event=event, superseded=superseded)


def state_event(row: JobSummary, state: JobState, reason: str) -> JobStateEvent:
    return JobStateEvent(job=row.model_copy(update={"state": state, "reason": reason}), reason=reason)


# -- chart ----------------------------------------------------------------------------------------


def test_column_spans_keep_spikes_when_downsampling() -> None:
    steps = np.arange(10_000, dtype=float)
    values = np.zeros(10_000)
    values[4321] = 5.0  # one spike among 10,000 points, drawn on 100 pixel columns
    cols, lo, hi = column_spans(steps, values, 0, 9999, 100)
    assert len(cols) == 100
    assert hi.max() == 5.0 and lo.min() == 0.0
    assert hi[43] == 5.0


def test_column_spans_join_sparse_points() -> None:
    steps = np.array([0.0, 50.0, 100.0])
    values = np.array([1.0, 3.0, 1.0])
    cols, lo, hi = column_spans(steps, values, 0, 100, 101)
    assert list(cols) == list(range(101))  # every column between the points is filled
    assert hi[25] == pytest.approx(2.0, abs=0.05)


def test_column_spans_ignore_nan_and_out_of_range() -> None:
    cols, lo, hi = column_spans(np.array([0.0, 1.0, 2.0]), np.array([np.nan, 1.0, 2.0]), 1, 1, 10)
    assert len(cols) == 1 and lo[0] == 1.0
    cols, _, _ = column_spans(np.array([]), np.array([]), 0, 1, 10)
    assert len(cols) == 0


# -- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({"TERM": "xterm-256color"}, "halfblock"),
        ({"TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1"}, "kitty"),
        ({"TERM": "tmux-256color", "KITTY_WINDOW_ID": "1", "TMUX": "/tmp/x"}, "halfblock"),
        ({"TERM": "screen-256color"}, "halfblock"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "sixel"),
        ({"TERM": "foot"}, "sixel"),
        ({"TERM": "dumb"}, "none"),
    ],
)
def test_detect_mode_is_conservative(env: dict[str, str], mode: str) -> None:
    assert images.detect_mode(env) == mode


def test_resolve_mode() -> None:
    assert images.resolve_mode("sixel", {}) == "sixel"
    assert images.resolve_mode("auto", {"TERM": "xterm"}) == "halfblock"
    with pytest.raises(ValueError):
        images.resolve_mode("png", {})


def _image(w: int = 20, h: int = 10) -> Image.Image:
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (0, h // 2, w, h))
    return img


def test_halfblock_two_pixels_per_cell() -> None:
    strips = images.halfblock_strips(_image(20, 10), 20, 5)
    assert len(strips) == 5
    assert all(s.cell_length == 20 for s in strips)
    seg = next(s for s in strips[0] if s.text.strip())
    assert seg.text[0] == "▀"
    assert seg.style.color.triplet == (255, 0, 0)
    last = next(s for s in strips[-1] if s.text.strip())
    assert last.style.bgcolor.triplet == (0, 0, 255)


def test_sixel_sequence() -> None:
    seq = images.sixel(_image(20, 12))
    assert seq.startswith("\x1bP") and seq.endswith("\x1b\\")
    assert '"1;1;20;12' in seq
    body = seq[seq.index("q") + 1 : -2]
    assert body.count("-") == 2  # two bands of six rows
    assert "#0;2;" in body or "#1;2;" in body


def test_fit_cells_keeps_the_aspect_ratio() -> None:
    # A 2x3 sample grid in a 46x14-cell pane of 7x15-pixel cells (xterm, DejaVu Sans Mono 9):
    # height-bound, so it covers fewer columns than the pane has (and is centred in it).
    fitted, cols, rows = images.fit_cells(_image(200, 300), 46, 14, (7, 15))
    assert fitted.size == (140, 210)
    assert (cols, rows) == (20, 14)
    _, cols, rows = images.fit_cells(_image(300, 100), 10, 10, (10, 20))
    assert (cols, rows) == (10, 2)  # 100x33 pixels: two rows, not the ten Kitty would stretch it over


def test_kitty_sequence_is_chunked() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    seq = images.kitty(noisy, 10, 5)
    chunks = seq.split("\x1b\\")[:-1]
    assert len(chunks) > 1
    assert chunks[0].startswith("\x1b_Ga=T,f=100") and "c=10,r=5" in chunks[0]
    assert chunks[-1].startswith("\x1b_Gm=0;")
    assert images.decode(b"not a png") is None


# -- model ----------------------------------------------------------------------------------------


def test_series_grows_and_rewrites_after_a_resume() -> None:
    s = Series(capacity=2)
    for i in range(1, 11):
        s.append(i, float(i))
    assert len(s) == 10 and s.at(5) == 5.0 and s.at(5.5) is None
    s.append(4, -1.0)  # resumed from step 3: steps 4.. are rewritten
    assert list(s.steps) == [1, 2, 3, 4] and s.last() == -1.0


def test_model_merges_history_and_live_without_duplicates() -> None:
    m = Model()
    m.set_jobs([JobSummary(id=1, name="a", state="running", total_steps=100)])
    d = m.data_for(1)  # the user selected the job: its history is on the way
    live = [env(3, MetricsEvent(step=3, values={"loss": 0.3}))]
    m.apply_live(live)
    assert not d.loaded and len(d.pending) == 1
    history = [env(i, MetricsEvent(step=i, values={"loss": i / 10})) for i in (1, 2, 3)]
    m.apply_history(1, history)
    m.apply_live([env(3, MetricsEvent(step=3, values={"loss": 0.3}))])  # a duplicate
    m.apply_live([env(5, MetricsEvent(step=4, values={"loss": 0.4}))])
    assert list(d.series["loss"].steps) == [1, 2, 3, 4]
    assert m.jobs[1].step == 4


def test_model_rollback_turning_point_and_failure() -> None:
    m = Model()
    m.set_jobs([JobSummary(id=1, name="a", state="running")])
    events: list = [
        MetricsEvent(step=s, values={"loss": 1.0, "cs_fluct": 2.0, "cs_fluct_step": s - 5})
        for s in range(10, 41, 10)
    ]
    events += [CheckpointEvent(step=20, path="c/20"), TurningPointEvent(step=30, seen_at=40)]
    events += [RolledBackEvent(step=20, resume=True)]
    m.apply_history(1, [env(i + 1, e) for i, e in enumerate(events)])
    d = m.data[1]
    assert list(d.series["cs_fluct"].steps) == [5, 15]  # placed at cs_fluct_step, cut at the rollback
    assert "cs_fluct_step" not in d.series
    assert list(d.series["loss"].steps) == [10, 20]
    assert d.turning_point is None  # it was found after the step rolled back to
    m.apply_live([env(99, state_event(m.jobs[1], "failed", "oom: CUDA out of memory"))])
    assert m.jobs[1].state == "failed" and m.jobs[1].reason == "oom: CUDA out of memory"
    assert d.log[-1] == ("error", "state failed: oom: CUDA out of memory")


def test_eta() -> None:
    row = JobSummary(id=1, name="a", state="running", step=100, total_steps=1000, steps_per_s=3.0)
    assert eta_seconds(row) == 300
    assert format_eta(300) == "5m00s" and format_eta(7300) == "2h01m" and format_eta(None) == "-"
    assert eta_seconds(JobSummary(id=1, name="a", state="queued", total_steps=10, steps_per_s=1.0)) is None


def test_rollback_keeps_the_abandoned_branch_apart() -> None:
    m = Model()
    m.set_jobs([JobSummary(id=1, name="a", state="running")])
    live = [env(s, MetricsEvent(step=s, values={"loss": 1.0})) for s in range(1, 11)]
    m.apply_history(1, live)
    m.apply_live([env(11, RolledBackEvent(step=6, resume=True))])
    m.apply_live([env(12, MetricsEvent(step=7, values={"loss": 0.5}))])
    d = m.data[1]
    assert list(d.series["loss"].steps) == [1, 2, 3, 4, 5, 6, 7]
    assert list(d.superseded["loss"].steps) == [7, 8, 9, 10]
    # The same run read back from the daemon's history, where the replaced events come flagged.
    m2 = Model()
    hist = [env(s, MetricsEvent(step=s, values={"loss": 1.0}), superseded=s > 6) for s in range(1, 11)]
    hist += [env(11, RolledBackEvent(step=6, resume=True))]
    hist += [env(12, MetricsEvent(step=7, values={"loss": 0.5}))]
    m2.apply_history(1, hist)
    d2 = m2.data[1]
    assert list(d2.series["loss"].steps) == list(d.series["loss"].steps)
    assert list(d2.superseded["loss"].steps) == [7, 8, 9, 10]

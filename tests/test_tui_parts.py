"""The TUI's pure parts: chart drawing, image mode detection (textual-image), the event model."""

from __future__ import annotations

import importlib
import io
import sys

import numpy as np
import pytest

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
from dallm.tui.chart import Chart, Trace, column_spans, ema, value_at
from dallm.tui.demo import sample_png
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


def chart_text(chart: Chart, width: int = 60, height: int = 12) -> list[str]:
    return [strip.text for strip in chart._draw(width, height)]


def test_ema_is_debiased_and_matches_the_recurrence() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)
    s, want = 0.0, []
    for i, v in enumerate(x):
        s = 0.9 * s + 0.1 * v
        want.append(s / (1 - 0.9 ** (i + 1)))
    assert np.allclose(ema(x, 0.9, block=64), want)
    assert ema(np.array([5.0, 5.0]), 0.99)[0] == pytest.approx(5.0)  # not pulled towards 0
    assert ema(x, 0.0) is x


def test_value_at_reads_the_nearest_point() -> None:
    steps, values = np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0, 3.0])
    assert value_at(steps, values, 24) == (1, 2.0)
    assert value_at(steps, values, 26) == (2, 3.0)
    assert value_at(steps, values, 0) == (0, 1.0) and value_at(steps[:0], values[:0], 1) is None


def test_log_scale_spreads_orders_of_magnitude() -> None:
    # CS-Fluctuation spans 1e-8..6e-5: on a linear axis everything below 1e-6 sits on the bottom row.
    steps = np.arange(100, dtype=float)
    values = np.logspace(-8, np.log10(6e-5), 100)
    chart = Chart("CS-Fluctuation")
    chart.set_data([Trace("cs_fluct", steps, values, "magenta")], 1)
    linear = chart_text(chart)
    chart.set_data([Trace("cs_fluct", steps, values, "magenta")], 2, log_y=True)
    log = chart_text(chart)
    assert "(log)" in log[0] and "(log)" not in linear[0]
    assert log[1].strip().startswith("6.0e-05") and log[-2].strip().startswith("1.0e-08")

    def bottom_half(lines: list[str]) -> int:  # braille cells with dots in the lower half
        return sum(ch != chr(0x2800) and ord(ch) >= 0x2800 for ln in lines[6:-1] for ch in ln)

    assert bottom_half(log) < bottom_half(linear)  # the curve climbs on the log axis, not flat at the bottom
    chart.set_data([Trace("cs_fluct", steps, values - 1e-6, "magenta")], 3, log_y=True)
    assert "53 values ≤ 0 hidden (log)" in chart_text(chart, width=90)[0]


def test_cursor_reads_values_at_its_step() -> None:
    steps = np.array([0.0, 50.0, 100.0])
    chart = Chart("KID")
    kid = Trace("val", steps, np.array([0.1, 0.05, 0.02]), "green", err=np.array([0.01, 0.02, 0.005]))
    chart.set_data([kid], 1, cursor=48.0)
    text = chart_text(chart, width=90)
    assert "@ step 48" in text[0] and "val 0.05±0.02 (step 50)" in text[0]
    assert any("│" in line for line in text[1:-1])  # the cursor's column


def test_error_bars_and_negative_kid_note() -> None:
    steps = np.array([10.0, 20.0, 30.0])
    kid = Trace("val", steps, np.array([0.01, -0.002, 0.004]), "green", err=np.array([0.05, 0.05, 0.05]))
    chart = Chart("KID")
    chart.set_data([kid], 1)
    text = chart_text(chart, width=90, height=14)
    assert "1 KID < 0 (unbiased estimate: read as 0)" in text[0]
    assert text[1].strip().startswith("0.06")  # the axis reaches the top of the bars (0.004 + 0.05 ...)
    assert any("╌" in line for line in text)  # the zero line
    assert sum(line.count("●") for line in text) == 3  # each evaluation marked
    chart.set_data([Trace("val", steps, np.array([0.01, 0.02, 0.004]), "green")], 2)
    assert "KID < 0" not in chart_text(chart, width=90)[0]


def test_single_evaluation_is_a_labelled_point() -> None:
    # One KID among 400 steps of loss: it was a lone dot at the right edge.
    kid = Trace("val", np.array([400.0]), np.array([0.0123]), "green")
    chart = Chart("KID")
    chart.set_data([kid], 1, x_range=(0.0, 400.0))
    body = chart_text(chart)[1:-1]
    row = next(line for line in body if "●" in line)
    assert "0.0123" in row and row.index("0.0123") < row.index("●")  # labelled, inside the chart
    chart.set_data([kid], 2)  # only that step: centred, not at an edge
    row = next(line for line in chart_text(chart)[1:-1] if "●" in line)
    assert 20 < row.index("●") < 45


# -- images ---------------------------------------------------------------------------------------


def test_no_graphics_protocol_detected_means_half_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """textual-image found neither Sixel (DA1) nor Kitty graphics: half-blocks, never its coarser
    unicode last resort, never nothing. Its choice is replayed with both queries answering "no"."""
    import textual_image.renderable as renderable
    import textual_image.widget  # noqa: F401  (measures the cell size now, on the real stdout)
    from textual_image.renderable import sixel, tgp

    class Stdout(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sixel, "query_terminal_support", lambda: False)
    monkeypatch.setattr(tgp, "query_terminal_support", lambda: False)
    try:
        for tty in (True, False):  # a terminal that answers "no" to both, and output that is no terminal
            monkeypatch.setattr(sys, "__stdout__", Stdout(tty))
            importlib.reload(renderable)  # it decides when imported (before Textual starts)
            assert renderable.is_tty is tty
            assert images.detect_mode() == "halfblock"
            assert images.resolve_mode("auto") == "halfblock"
    finally:
        monkeypatch.undo()
        importlib.reload(renderable)
    from textual_image.widget import HalfcellImage

    assert images.widget_class("halfblock") is HalfcellImage
    assert images.widget_class("none") is None


def test_detected_protocols_map_to_modes() -> None:
    from textual_image.renderable import HalfcellImage, SixelImage, TGPImage, UnicodeImage
    from textual_image.widget import SixelImage as SixelWidget
    from textual_image.widget import TGPImage as TGPWidget

    # Sixel: textual-image's widget, with the fixes of tui/compat.py (tests/test_tui_frames.py)
    assert images.mode_of(SixelImage) == "sixel" and issubclass(images.widget_class("sixel"), SixelWidget)
    assert images.mode_of(TGPImage) == "kitty" and images.widget_class("kitty") is TGPWidget
    assert images.mode_of(HalfcellImage) == images.mode_of(UnicodeImage) == "halfblock"


def test_resolve_mode() -> None:
    assert images.resolve_mode("sixel") == "sixel"
    with pytest.raises(ValueError, match="--images: expected one of"):
        images.resolve_mode("png")


def test_grid_cells_cut_the_engines_thumbnail() -> None:
    png = sample_png(100)
    grid = images.decode(png)
    assert grid is not None and images.decode(b"not a png") is None
    cells = images.grid_cells(grid, 2, 2)
    assert cells is not None and len(cells) == 4 and {c.size for c in cells} == {(24, 24)}
    # no white pad inside a cell: the cut lands on the cells, not on the grid's lines
    assert all(min(c.getpixel((x, y)) for x in (0, 23) for y in (0, 23)) != (255, 255, 255) for c in cells)
    assert images.grid_cells(grid, 0, 2) is None and images.grid_cells(grid, 40, 40) is None


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


def test_the_measure_drawn_is_the_one_the_jobs_kind_names() -> None:
    m = Model()
    m.set_jobs([JobSummary(id=1, name="a", state="running")])
    assert m.history(1) is None  # not loaded yet: nothing to draw
    values = {"kid_val": 0.25, "kid_val_std": 0.01, "ppl_val": 40.0, "ppl_val_std": 2.0}
    m.apply_history(1, [env(1, MetricsEvent(step=10, values=values))])
    image = m.history(1)
    # an image job's row (kind defaults to "image"): KID, whatever other series the job logs
    assert image is not None and image.measure.title == "KID" and image.validation_at(10) == (0.25, 0.01)
    m.set_jobs([JobSummary(id=1, name="a", state="running", kind="llm", validation_measure="ppl_val")])
    llm = m.history(1)
    assert llm is not None and llm.measure.title == "perplexity" and llm.measure.log_y
    assert llm.validation_at(10) == (40.0, 2.0) and llm.validation_at(11) == (None, None)
    assert llm != image  # another kind: the widgets bound to it redraw ...
    assert m.history(1) == llm  # ... the same history at the same version: they do not


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

"""The selected job's two charts, side by side in time: CS-Fluctuation and what the job measures
(KID, perplexity), or loss and CS; one step window, cursor and smoothing for both."""

from __future__ import annotations

import numpy as np
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive, var

from dallm.tui.chart import Chart, Trace, ema
from dallm.tui.model import HistoryView, JobData, Series

SMOOTHING = (0.0, 0.6, 0.9, 0.99)  # TensorBoard's EMA weights, cycled by a key
MIN_SPAN = 10.0  # steps: zooming in stops here


class Charts(Vertical):
    """Two charts of the selected job: CS-Fluctuation + its measure (KID, perplexity), or (toggled)
    loss + CS. Both share one step window (zoom, pan), one cursor and the smoothing; each has its own
    y-scale (CS-Fluctuation spans orders of magnitude: log by default). Drawn from `history` (bound
    to the app's selected job): a new version of it redraws them."""

    view: reactive[str] = reactive("fluct")  # or "loss"
    history: var[HistoryView | None] = var(None)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window: tuple[float, float] | None = None  # the steps shown; None: all of them
        self.cursor: float | None = None
        self.smoothing = 0.0
        self.log_y = {"CS-Fluctuation": True}  # by chart title; absent: linear
        self._full: tuple[float, float] | None = None

    def compose(self) -> ComposeResult:
        yield Chart("CS-Fluctuation", id="chart-top")
        yield Chart("KID", id="chart-bottom")

    # -- interaction ----------------------------------------------------------------------------

    def _shown(self) -> tuple[float, float] | None:
        return self.window or self._full

    def zoom(self, factor: float) -> None:
        """Narrow (factor < 1) or widen the step window, about the cursor or the window's centre."""
        shown, full = self._shown(), self._full
        if shown is None or full is None:
            return
        a, b = shown
        centre = self.cursor if self.cursor is not None and a <= self.cursor <= b else (a + b) / 2
        width = min(max((b - a) * factor, MIN_SPAN), full[1] - full[0])
        left = centre - (centre - a) * width / max(b - a, 1e-9)
        self._set_window(left, left + width)

    def pan(self, direction: int) -> None:
        shown = self._shown()
        if shown is not None:
            a, b = shown
            step = (b - a) / 4 * direction
            self._set_window(a + step, b + step)

    def _set_window(self, a: float, b: float) -> None:
        full = self._full
        if full is None:
            return
        width = b - a
        a = min(max(a, full[0]), full[1] - width)
        self.window = None if width >= full[1] - full[0] else (a, a + width)
        self.redraw()

    def move_cursor(self, direction: int) -> None:
        """Move the cursor one column (shows it at the centre first); the window follows it."""
        shown = self._shown()
        if shown is None:
            return
        a, b = shown
        if self.cursor is None or not a <= self.cursor <= b:
            self.cursor = round((a + b) / 2)
        else:
            cols = max(self.query_one("#chart-top", Chart).size.width - 9, 1)
            self.cursor = round(self.cursor + direction * max(1.0, (b - a) / cols))
        full = self._full or shown
        self.cursor = min(max(self.cursor, full[0]), full[1])
        if not a <= self.cursor <= b:
            self.pan(direction)
        self.redraw()

    def set_cursor(self, step: float) -> None:
        self.cursor = round(step)
        self.redraw()

    def toggle_log(self) -> None:
        """The top chart's y-scale (CS-Fluctuation, or loss in the other view)."""
        title = self.query_one("#chart-top", Chart).title
        self.log_y[title] = not self.log_y.get(title, False)
        self.redraw()

    def cycle_smoothing(self) -> float:
        self.smoothing = SMOOTHING[(SMOOTHING.index(self.smoothing) + 1) % len(SMOOTHING)]
        self.redraw()
        return self.smoothing

    def reset(self) -> None:
        self.window, self.cursor = None, None
        self.redraw()

    def on_chart_cursor_set(self, message: Chart.CursorSet) -> None:
        self.set_cursor(message.step)

    def watch_view(self) -> None:
        self.redraw()

    def watch_history(self, old: HistoryView | None, new: HistoryView | None) -> None:
        if old is None or new is None or old.job != new.job:
            self.window, self.cursor = None, None  # another job: its own steps
        self.redraw()

    # -- data -----------------------------------------------------------------------------------

    def redraw(self) -> None:
        if not self.is_mounted:
            return
        top, bottom = self.query_one("#chart-top", Chart), self.query_one("#chart-bottom", Chart)
        history = self.history
        if history is None:
            self._full = None
            top.set_data([], None)
            bottom.set_data([], None)
            return
        data, smooth = history.data, self.smoothing

        def trace(name: str, label: str, color: str, smoothed: bool = False) -> list[Trace]:
            out = []
            old = data.superseded.get(name)
            if old is not None and len(old):
                out.append(Trace(label, old.steps, old.values, "grey50", dim=True))
            s = data.series.get(name)
            if s is not None and len(s):
                if smoothed and smooth:
                    out.append(Trace(label, s.steps, s.values, color, dim=True))  # raw, faint, under
                    out.append(Trace(label, s.steps, ema(s.values, smooth), color))
                else:
                    out.append(Trace(label, s.steps, s.values, color, err=spread(data, name, s)))
            return out

        marker = None
        if data.turning_point is not None:
            marker = (float(data.turning_point), f"turning point {data.turning_point}")
        steps = [s.steps for s in [*data.series.values(), *data.superseded.values()] if len(s)]
        self._full = (min(float(s[0]) for s in steps), max(float(s[-1]) for s in steps)) if steps else None
        x_range = self._shown()
        key = (data.job, data.version, self.view, x_range, self.cursor, smooth, tuple(self.log_y.items()))
        common = {"x_range": x_range, "cursor": self.cursor}
        smoothing = f" (smoothed {smooth:g})" if smooth else ""
        if self.view == "fluct":
            top.empty_text = "no CS-Fluctuation yet (t: loss and CS)"
            title = "CS-Fluctuation"
            top.set_data(
                trace("cs_fluct", "cs_fluct", "magenta", True),
                key,
                marker=marker,
                title=title + smoothing,
                log_y=self.log_y.get(title, False),
                **common,
            )
            # What the job measures (its kind says): KID for an image job, perplexity for an LLM job.
            measure = history.measure
            metric = measure.series
            kid = trace(f"{metric}_train", "train", "blue") + trace(f"{metric}_val", "val", "green")
            kid += trace(f"{metric}_base", "base", "red")
            log_y = self.log_y.get(measure.title, measure.log_y)
            bottom.set_data(kid, key, title=measure.title, log_y=log_y, **common)
        else:
            top.empty_text = "no data yet"
            top.set_data(
                trace("loss", "loss", "cyan", True),
                key,
                title="Loss" + smoothing,
                log_y=self.log_y.get("Loss", False),
                **common,
            )
            bottom.set_data(
                trace("cs", "cs", "magenta", True),
                key,
                marker=marker,
                title="CS" + smoothing,
                log_y=self.log_y.get("CS", False),
                **common,
            )


def spread(data: JobData, name: str, series: Series) -> np.ndarray | None:
    """The `<name>_std` logged with each point of `series` (NaN where none was), or None."""
    std = data.series.get(f"{name}_std")
    if std is None or not len(std):
        return None
    i = np.minimum(np.searchsorted(std.steps, series.steps), len(std) - 1)
    return np.where(std.steps[i] == series.steps, std.values[i], np.nan)

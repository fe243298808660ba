"""The dashboard's widgets: queue table, job header, charts, checkpoints, event log, connection bar."""

from __future__ import annotations

import time

import numpy as np
from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import DataTable, OptionList, RichLog, Static
from textual.widgets.data_table import ColumnKey, RowKey
from textual.widgets.option_list import Option

from dallm.protocol import JobSummary, kid_text, phase_text
from dallm.tui.chart import Chart, Trace, ema
from dallm.tui.model import JobData, Series, eta_seconds, format_eta

STATE_STYLES = {
    "queued": "dim",
    "running": "bold green",
    "stopping": "yellow",
    "finished": "cyan",
    "stopped-early": "cyan",
    "failed": "bold red",
    "cancelled": "dim",
}


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def live_state_text(row: JobSummary, now: float) -> Text:
    """The state and, for a live job, its phase and the time in it: a step counter that stands
    still during an evaluation says why."""
    text = state_text(row.state)
    phase = phase_text(row, now)
    if phase:
        text.append(f" · {phase}", style="cyan")
    return text


_RUN_ORDER = {"running": 0, "stopping": 0, "queued": 1}


def run_order(row: JobSummary) -> tuple:
    """The queue as it runs: running jobs, then the queued ones in the order the scheduler starts
    them (priority, then age), then ended jobs, newest first."""
    rank = _RUN_ORDER.get(row.state, 2)
    if rank == 0:
        return (0, row.id)
    if rank == 1:
        return (1, -row.priority, row.id)
    return (2, -row.updated, -row.id)


class ConnectionBar(Static):
    """One line: where the TUI is connected, or that it is not and when it retries."""

    endpoint: reactive[str] = reactive("")
    connected: reactive[bool] = reactive(False)
    detail: reactive[str] = reactive("connecting…")

    def render(self) -> Text:
        if self.connected:
            return Text.assemble(("● connected ", "bold green"), (self.endpoint, "dim"))
        return Text.assemble(
            ("○ disconnected ", "bold red"), (self.endpoint, "dim"), ("  " + self.detail, "red")
        )

    def watch_connected(self, connected: bool) -> None:
        self.set_class(not connected, "-disconnected")


class JobTable(DataTable):
    """The queue. Posts `JobHighlighted` when the cursor lands on a job."""

    COLUMNS = (
        ("id", "ID"),
        ("name", "Name"),
        ("state", "State"),
        ("step", "Step"),
        ("phase", "Phase"),  # what a step that stands still waits for (evaluation, a checkpoint)
        ("kid", "KID val"),
        ("tp", "TP"),
        ("eta", "ETA"),
        ("device", "Device"),
        ("pri", "Pri"),
    )

    class JobHighlighted(Message):
        def __init__(self, job: int) -> None:
            super().__init__()
            self.job = job

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    @staticmethod
    def cells(row: JobSummary, marked: bool = False) -> dict[str, object]:
        step = f"{row.step}/{row.total_steps}" if row.total_steps else str(row.step)
        return {
            "id": str(row.id),
            # A job marked for comparison (space) carries a dot before its name.
            "name": Text.assemble(("● ", "bold magenta"), row.name) if marked else row.name,
            "state": state_text(row.state),
            "step": step,
            "phase": Text(phase_text(row, time.time()) or "-", style="cyan"),
            "kid": kid_text(row.kid_val, row.kid_val_std),
            "tp": "-" if row.turning_point is None else Text(f"✓ {row.turning_point}", style="yellow"),
            "eta": format_eta(eta_seconds(row)),
            "device": row.device or "-",
            "pri": str(row.priority),
        }

    def show_jobs(self, rows: list[JobSummary], marked: frozenset[int] | set[int] = frozenset()) -> None:
        """Bring the table in line with `rows` (in the order given: the queue view sorts them),
        touching only the cells that changed; `marked`: the jobs marked for comparison."""
        wanted = {str(r.id) for r in rows}  # row keys are the ids as text
        for key in [k for k in self.rows if k.value not in wanted]:
            self.remove_row(key)
        present = {k.value for k in self.rows}
        for row in rows:
            cells = self.cells(row, row.id in marked)
            key = str(row.id)
            if key not in present:
                self.add_row(*cells.values(), key=key)
                continue
            for col, value in cells.items():
                if str(self.get_cell(key, col)) != str(value):
                    self.set_cell(key, col, value)
        rank = {str(r.id): i for i, r in enumerate(rows)}
        if [k.value for k in self.ordered_rows_keys()] != [str(r.id) for r in rows]:
            self.sort("id", key=lambda cell: rank[str(cell)])

    def set_cell(self, row: str, column: str, value: object) -> None:
        """`update_cell`, redrawing only the row it changes.

        DataTable keys every render cache by one update counter, so its `update_cell` re-renders
        every cell of the table (through Rich) in the next frame; a step counter ticking in one row
        re-rendered all of them twice a second: 10 rows cost 25-120 ms, the slowest frames of
        bench_tui. Here the changed row's cached lines are dropped and only its region is
        refreshed. A value wider than its column takes DataTable's own path (the column widens,
        every line moves)."""
        row_key, column_key = RowKey(row), ColumnKey(column)
        if cell_len(str(value)) > self.columns[column_key].content_width:
            self.update_cell(row_key, column_key, value, update_width=True)
            return
        self._data[row_key][column_key] = value
        self._forget_row(row_key)
        self.refresh_row(self.get_row_index(row_key))

    def _forget_row(self, row_key: RowKey) -> None:
        """Drop `row_key`'s entries from DataTable's render caches (the rest stay valid)."""
        for cache in (self._cell_render_cache, self._row_render_cache):
            keys = cache.keys()  # LRUCache has no iterator of its own
            for k in [k for k in keys if k[0] == row_key]:
                cache.discard(k)
        self._row_renderable_cache.discard((self._update_count, self.get_row_index(row_key)))
        for k in list(self._line_cache.keys()):
            try:
                if self._get_offsets(k[0])[0] == row_key:
                    self._line_cache.discard(k)
            except LookupError:  # a line of no row (past the end): nothing of ours
                continue

    def ordered_rows_keys(self) -> list:
        return [row.key for row in self.ordered_rows]

    @property
    def current_job(self) -> int | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        return int(key.value) if key.value is not None else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.JobHighlighted(int(event.row_key.value)))


class JobHeader(Static):
    """The selected job's name, state and the reason for it (a failed job's error)."""

    def update(self, content="") -> None:  # type: ignore[override]
        if str(content) != str(getattr(self, "_last", None)) or getattr(self, "_last", None) != content:
            self._last = content
            super().update(content)

    def show(self, row: JobSummary | None) -> None:
        if row is None:
            self.update(Text("no job selected", style="dim"))
            return
        text = Text.assemble((f"{row.id} ", "bold"), (row.name + "  ", ""), live_state_text(row, time.time()))
        if row.reason:
            style = "bold red" if row.state == "failed" else "yellow"
            text.append(f"  {row.reason}", style=style)
        self.update(text)


SMOOTHING = (0.0, 0.6, 0.9, 0.99)  # TensorBoard's EMA weights, cycled by a key
MIN_SPAN = 10.0  # steps: zooming in stops here


class Charts(Vertical):
    """Two charts of the selected job: CS-Fluctuation + KID, or (toggled) loss + CS. Both share one
    step window (zoom, pan), one cursor and the smoothing; each has its own y-scale (CS-Fluctuation
    spans orders of magnitude: log by default)."""

    view: reactive[str] = reactive("fluct")  # or "loss"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window: tuple[float, float] | None = None  # the steps shown; None: all of them
        self.cursor: float | None = None
        self.smoothing = 0.0
        self.log_y = {"CS-Fluctuation": True}  # by chart title; absent: linear
        self._data: JobData | None = None
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

    def redraw(self) -> None:
        if self.is_mounted:
            self.show(self._data)

    # -- data -----------------------------------------------------------------------------------

    def show(self, data: JobData | None) -> None:
        top, bottom = self.query_one("#chart-top", Chart), self.query_one("#chart-bottom", Chart)
        if data is None or data is not self._data:
            self.window, self.cursor = None, None  # another job: its own steps
        self._data = data
        if data is None:
            self._full = None
            top.set_data([], None)
            bottom.set_data([], None)
            return
        smooth = self.smoothing

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
            # What the job measures: perplexity for an LLM job, KID for an image job.
            llm = "ppl_val" in data.series or "ppl_train" in data.series
            metric, title = ("ppl", "perplexity") if llm else ("kid", "KID")
            kid = trace(f"{metric}_train", "train", "blue") + trace(f"{metric}_val", "val", "green")
            kid += trace(f"{metric}_base", "base", "red")
            # perplexity falls by decades (35,000 to 2 on the micro LLM): log scale unless toggled
            log_y = self.log_y.get(title, llm)
            bottom.set_data(kid, key, title=title, log_y=log_y, **common)
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


class CheckpointList(OptionList):
    """Checkpoints of the selected job (step, KID where known); the turning point is starred. The
    cursor follows the newest checkpoint until the user moves it (keys, mouse), then stays on the
    step chosen: kept on an old one while new ones arrived, the first ↓ wrapped round to the top."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._shown: tuple = ()
        self._rebuilding = False
        self._picked = False  # the user moved the cursor (for the job shown)

    def watch_highlighted(self, highlighted: int | None) -> None:
        super().watch_highlighted(highlighted)
        if not self._rebuilding and highlighted is not None:
            self._picked = True

    def show(self, data: JobData | None) -> None:
        rows: list[tuple[int, float | None, float | None, bool]] = []
        if data is not None:
            steps = {c.step for c in data.checkpoints}
            if data.turning_point is not None:
                steps.add(data.turning_point)
            rows = [
                (s, data.kid_at(s), data.kid_at(s, "kid_val_std"), s == data.turning_point)
                for s in sorted(steps, reverse=True)
            ]
        shown = (data.job if data else None, tuple(rows))
        if shown == self._shown:
            return
        same_job = data is not None and bool(self._shown) and self._shown[0] == data.job
        keep = self.chosen_step if same_job and self._picked else None
        self._shown = shown
        self._rebuilding = True
        try:
            self.clear_options()
            for step, kid, std, tp in rows:
                label = Text(f"step {step:>6}  KID {kid_text(kid, std):>7}")
                if tp:
                    label.append(" ★ TP", style="yellow")
                self.add_option(Option(label, id=str(step)))
            steps_list = [r[0] for r in rows]
            self._picked = keep in steps_list  # a pick a rollback erased, or another job: follow again
            if rows:
                self.highlighted = steps_list.index(keep) if keep in steps_list else 0
        finally:
            self._rebuilding = False

    @property
    def chosen_step(self) -> int | None:
        if self.highlighted is None or not self.option_count:
            return None
        option = self.get_option_at_index(self.highlighted)
        return int(option.id) if option.id is not None else None


class EventLog(RichLog):
    """Log lines and events of the selected job, and the outcome of every action."""

    LEVEL_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=1000, wrap=False, markup=False, **kwargs)
        self._shown: tuple[int | None, int] = (None, 0)

    def show(self, data: JobData | None) -> None:
        """Append what is new in `data.log` (or start over for another job)."""
        job = data.job if data else None
        total = data.log_total if data else 0
        last_job, last_total = self._shown
        if job != last_job or total < last_total:
            self.clear()
            last_total = 0
        if data is not None and total > last_total:
            new = min(total - last_total, len(data.log))
            for level, line in list(data.log)[len(data.log) - new :]:
                self.write(Text(line, style=self.LEVEL_STYLES.get(level, "")))
        self._shown = (job, total)

    def note(self, line: str, style: str = "italic") -> None:
        self.write(Text(line, style=style))

"""The dashboard's widgets: queue table, job header, charts, checkpoints, event log, connection bar."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import DataTable, OptionList, RichLog, Static
from textual.widgets.option_list import Option

from dallm.protocol import JobSummary, phase_text
from dallm.tui.chart import Chart, Trace
from dallm.tui.model import JobData, eta_seconds, format_eta

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


def kid_text(kid: float | None, std: float | None = None) -> str:
    """A KID with its spread when known: a KID well inside its std is no evidence of anything."""
    if kid is None:
        return "-"
    return f"{kid:.4f}" if std is None else f"{kid:.4f}±{std:.2g}"


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
    def cells(row: JobSummary) -> dict[str, object]:
        step = f"{row.step}/{row.total_steps}" if row.total_steps else str(row.step)
        return {
            "id": str(row.id),
            "name": row.name,
            "state": state_text(row.state),
            "step": step,
            "phase": Text(phase_text(row, time.time()) or "-", style="cyan"),
            "kid": kid_text(row.kid_val, row.kid_val_std),
            "tp": "-" if row.turning_point is None else Text(f"✓ {row.turning_point}", style="yellow"),
            "eta": format_eta(eta_seconds(row)),
            "device": row.device or "-",
            "pri": str(row.priority),
        }

    def show_jobs(self, rows: list[JobSummary]) -> None:
        """Bring the table in line with `rows` (in run order), touching only the cells that changed."""
        rows = sorted(rows, key=run_order)
        wanted = {str(r.id) for r in rows}  # row keys are the ids as text
        for key in [k for k in self.rows if k.value not in wanted]:
            self.remove_row(key)
        present = {k.value for k in self.rows}
        for row in rows:
            cells = self.cells(row)
            key = str(row.id)
            if key not in present:
                self.add_row(*cells.values(), key=key)
                continue
            for col, value in cells.items():
                old = str(self.get_cell(key, col))
                if old != str(value):
                    # Widening a column relayouts the table: only when the text got longer.
                    self.update_cell(key, col, value, update_width=len(str(value)) > len(old))
        rank = {str(r.id): i for i, r in enumerate(rows)}
        if [k.value for k in self.ordered_rows_keys()] != [str(r.id) for r in rows]:
            self.sort("id", key=lambda cell: rank[str(cell)])

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


class Charts(Vertical):
    """Two charts of the selected job: CS-Fluctuation + KID, or (toggled) loss + CS."""

    view: reactive[str] = reactive("fluct")  # or "loss"

    def compose(self) -> ComposeResult:
        yield Chart("CS-Fluctuation", id="chart-top")
        yield Chart("KID", id="chart-bottom")

    def show(self, data: JobData | None) -> None:
        top, bottom = self.query_one("#chart-top", Chart), self.query_one("#chart-bottom", Chart)
        if data is None:
            top.set_data([], None)
            bottom.set_data([], None)
            return
        key = (data.job, data.version, self.view)

        def trace(name: str, label: str, color: str) -> list[Trace]:
            out = []
            old = data.superseded.get(name)
            if old is not None and len(old):
                out.append(Trace(label, old.steps, old.values, "grey50", dim=True))
            s = data.series.get(name)
            if s is not None and len(s):
                out.append(Trace(label, s.steps, s.values, color))
            return out

        marker = None
        if data.turning_point is not None:
            marker = (float(data.turning_point), f"turning point {data.turning_point}")
        steps = [s.steps for s in [*data.series.values(), *data.superseded.values()] if len(s)]
        x_range = (min(float(s[0]) for s in steps), max(float(s[-1]) for s in steps)) if steps else None
        if self.view == "fluct":
            top.empty_text = "no CS-Fluctuation yet (t: loss and CS)"
            top.set_data(
                trace("cs_fluct", "cs_fluct", "magenta"),
                key,
                marker=marker,
                x_range=x_range,
                title="CS-Fluctuation",
            )
            # What the job measures: perplexity for an LLM job, KID for an image job.
            llm = "ppl_val" in data.series or "ppl_train" in data.series
            metric = "ppl" if llm else "kid"
            kid = trace(f"{metric}_train", "train", "blue") + trace(f"{metric}_val", "val", "green")
            kid += trace(f"{metric}_base", "base", "red")
            if llm:  # perplexity falls by decades (35,000 to 2 on the micro LLM): log scale
                kid = [dataclasses.replace(t, values=np.log10(np.maximum(t.values, 1e-12))) for t in kid]
            bottom.set_data(kid, key, x_range=x_range, title="log10 perplexity" if llm else "KID")
        else:
            top.empty_text = "no data yet"
            top.set_data(trace("loss", "loss", "cyan"), key, x_range=x_range, title="Loss")
            bottom.set_data(trace("cs", "cs", "magenta"), key, marker=marker, x_range=x_range, title="CS")


class CheckpointList(OptionList):
    """Checkpoints of the selected job (step, KID where known); the turning point is starred."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._shown: tuple = ()

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
        keep = self.chosen_step if data is not None and self._shown and self._shown[0] == data.job else None
        self._shown = shown
        self.clear_options()
        for step, kid, std, tp in rows:
            label = Text(f"step {step:>6}  KID {kid_text(kid, std):>7}")
            if tp:
                label.append(" ★ TP", style="yellow")
            self.add_option(Option(label, id=str(step)))
        if rows:
            steps_list = [r[0] for r in rows]
            self.highlighted = steps_list.index(keep) if keep in steps_list else 0

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

"""The dashboard's widgets: queue table, job header, checkpoints, activity log, connection bar (the
charts: chart_panel.py). The selected job's widgets draw from reactive attributes the app binds
(data_bind) to its own: a widget redraws when its data changes, and only then."""

from __future__ import annotations

import time

from rich.text import Text
from textual.message import Message
from textual.reactive import reactive, var
from textual.widgets import DataTable, OptionList, RichLog, Static
from textual.widgets.option_list import Option

from dallm.protocol import JobSummary, kid_text, phase_text, step_text
from dallm.protocol.labels import validation_text, value_text
from dallm.tui.compat import set_cell_in_place
from dallm.tui.model import HistoryView, JobData, eta_seconds, format_eta

STATE_STYLES = {
    "queued": "dim",
    "running": "bold green",
    "stopping": "yellow",
    "finished": "cyan",
    "stopped": "cyan",
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
        ("step", "Step"),  # the trainer's, with the evaluations behind it
        ("loss", "Loss"),
        ("lr", "LR"),
        ("phase", "Phase"),  # what a step that stands still waits for (evaluation, a checkpoint)
        ("val", "Val ±sd mean"),  # the validation measure by the job's kind, ± the std of its mean
        ("vloss", "Val loss"),
        ("fid", "Fidelity"),  # prompt fidelity on held-out prompts
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
        return {
            "id": str(row.id),
            # A job marked for comparison (space) carries a dot before its name.
            "name": Text.assemble(("● ", "bold magenta"), row.name) if marked else row.name,
            "state": state_text(row.state),
            "step": step_text(row),
            "loss": "-" if row.loss is None else f"{row.loss:.4f}",
            "lr": "-" if row.lr is None else f"{row.lr:.1e}",
            "phase": Text(phase_text(row, time.time()) or "-", style="cyan"),
            "val": validation_text(row),
            "vloss": value_text(row.val_loss),
            "fid": "-" if row.fidelity is None else f"{row.fidelity:.2f}",
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
                    set_cell_in_place(self, key, col, value)  # redraws this row alone
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
    """The selected job's name, state and the reason for it (a failed job's error); without a job,
    `note` (text, style): why there is none."""

    row: var[JobSummary | None] = var(None)
    note: var[tuple[str, str]] = var(("no job selected", "dim"))

    def update(self, content="") -> None:  # type: ignore[override]
        if str(content) != str(getattr(self, "_last", None)) or getattr(self, "_last", None) != content:
            self._last = content
            super().update(content)

    def watch_row(self) -> None:
        self.redraw()

    def watch_note(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Draw the row again (also when only the time in its phase moved on)."""
        row = self.row
        if row is None:
            self.update(Text(self.note[0], style=self.note[1]))
            return
        text = Text.assemble((f"{row.id} ", "bold"), (row.name + "  ", ""), live_state_text(row, time.time()))
        if row.reason:
            style = "bold red" if row.state == "failed" else "yellow"
            text.append(f"  {row.reason}", style=style)
        self.update(text)


class CheckpointList(OptionList):
    """Checkpoints of the selected job as the daemon has them (step, KID where known): one deleted
    (`checkpoint.keep`) is gone from the list. The turning point is starred on the checkpoint that
    holds it; while the job runs its engine holds it in memory (offered); after that, without a
    checkpoint, it shows as "not kept" with why, and cannot be chosen. The
    cursor follows the newest checkpoint until the user moves it (keys, mouse), then stays on the
    step chosen: kept on an old one while new ones arrived, the first ↓ wrapped round to the top."""

    history: var[HistoryView | None] = var(None)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._shown: tuple = ()
        self._rebuilding = False
        self._picked = False  # the user moved the cursor (for the job shown)

    def watch_highlighted(self, highlighted: int | None) -> None:
        super().watch_highlighted(highlighted)
        if not self._rebuilding and highlighted is not None:
            self._picked = True

    def watch_history(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        history = self.history
        data = history.data if history else None
        rows: list[tuple[int, float | None, float | None, bool]] = []
        note = history.turning_point_note() if history is not None else None
        if history is not None and data is not None:
            steps = {c.step for c in data.checkpoints}
            if data.turning_point is not None and history.live:  # in the engine's memory
                steps.add(data.turning_point)
            rows = [
                (s, *history.validation_at(s), s == data.turning_point) for s in sorted(steps, reverse=True)
            ]
        measure = history.measure.short if history else ""
        shown = (data.job if data else None, measure, tuple(rows), note)
        if shown == self._shown:
            return
        same_job = data is not None and bool(self._shown) and self._shown[0] == data.job
        keep = self.chosen_step if same_job and self._picked else None
        self._shown = shown
        self._rebuilding = True
        try:
            self.clear_options()
            for step, kid, std, tp in rows:
                label = Text(f"step {step:>6}  {measure} {kid_text(kid, std):>7}")
                label.append(checkpoint_figures(data, step), style="dim")  # val loss, prompt fidelity
                if tp:
                    label.append(" ★ TP", style="yellow")
                self.add_option(Option(label, id=str(step)))
            if note is not None and data is not None:
                label = Text.assemble((f"★ TP {data.turning_point} not kept: ", "yellow"), (note, "dim"))
                self.add_option(Option(label, disabled=True))  # no id: never a rollback target
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


class ActivityLog(RichLog):
    """What happens: log lines and events of the selected job (`history`), the connection, and the
    outcome of every action (`note`)."""

    history: var[HistoryView | None] = var(None)

    LEVEL_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}

    def __init__(self, **kwargs) -> None:
        # wrapped: a long line (the background evaluation falling behind, what to do) is read whole
        super().__init__(max_lines=1000, wrap=True, markup=False, **kwargs)
        self._shown: tuple[int | None, int] = (None, 0)

    def watch_history(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Append what is new in the job's log (or start over for another job)."""
        data = self.history.data if self.history else None
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


def checkpoint_figures(data: JobData | None, step: int) -> str:
    """A checkpoint entry's other figures, where measured at its step: "  loss 0.123  fid 0.85"."""
    if data is None:
        return ""
    loss, fid = data.value_at("val_loss", step), data.value_at("fidelity", step)
    return (f"  loss {loss:.4g}" if loss is not None else "") + (
        f"  fid {fid:.2f}" if fid is not None else ""
    )

"""Compare runs: the CS-Fluctuation, validation-KID and training-loss curves of the marked jobs
overlaid, one colour per job, with a legend (the chart widget of tui/chart.py, as the job view uses
it), and what differs between their configs (read from the daemon)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from dallm.tui.chart import Chart, Trace
from dallm.tui.connection import Connection
from dallm.tui.model import JobData, Model
from dallm.tui.views.config_diff import diff_lines

# Distinct on dark and light themes; a job keeps its colour in both charts.
PALETTE = ("magenta", "green", "dodger_blue1", "orange1", "cyan", "red", "yellow", "purple")
REFRESH_S = 0.5  # live jobs move: redraw when a compared job's data changed, at most this often
SERIES = (
    ("cs_fluct", "CS-Fluctuation", "#compare-top"),
    ("kid_val", "KID (val)", "#compare-bottom"),
    ("loss", "loss", "#compare-loss"),
)


def compare_traces(model: Model, jobs: list[int], series: str) -> list[Trace]:
    """One trace per job with points of `series` (jobs without any are left out of the legend)."""
    out = []
    for i, job in enumerate(jobs):
        data = model.data.get(job)
        s = data.series.get(series) if data is not None and data.loaded else None
        if s is None or not len(s):
            continue
        row = model.jobs.get(job)
        label = f"{job} {row.name}" if row is not None else str(job)
        out.append(Trace(label, s.steps, s.values, PALETTE[i % len(PALETTE)]))
    return out


class CompareScreen(Screen[None]):
    """The marked jobs side by side. Histories load through the app's daemon feed; this screen
    redraws when their data moves."""

    BINDINGS = [Binding("escape,v,q", "app.pop_screen", "Back")]

    def __init__(self, model: Model, jobs: list[int], connection: Connection | None = None) -> None:
        super().__init__()
        self.model = model
        self.jobs = jobs
        self.connection = connection
        self._versions: tuple = ()

    def compose(self) -> ComposeResult:
        yield Static(id="compare-title")
        with Vertical(id="compare-charts"):
            yield Chart("CS-Fluctuation", id="compare-top")
            yield Chart("KID (val)", id="compare-bottom")
            yield Chart("loss", id="compare-loss")
        yield Static("config differences: reading the configs…", id="compare-config")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        names = [f"{j} {self.model.jobs[j].name}" if j in self.model.jobs else str(j) for j in self.jobs]
        self.query_one("#compare-title", Static).update(
            f"Comparing {len(self.jobs)} jobs: " + ", ".join(names)
        )
        self.redraw()
        self.set_interval(REFRESH_S, self.redraw)
        if self.connection is not None:
            self.run_worker(self._read_configs, thread=True, exit_on_error=False)

    def _read_configs(self) -> None:
        """In a thread: the jobs' configs from the daemon, then their differences on screen."""
        assert self.connection is not None
        try:
            configs = [self.connection.show(j).config for j in self.jobs]
        except Exception as e:  # the daemon went away, or refused: say so in place of the diff
            text = f"config differences: could not read the configs ({e})"
        else:
            text = "\n".join(diff_lines([str(j) for j in self.jobs], configs))
        self.app.call_from_thread(self.query_one("#compare-config", Static).update, text)

    def _data(self) -> list[JobData | None]:
        return [self.model.data.get(j) for j in self.jobs]

    def redraw(self) -> None:
        versions = tuple((d.version, d.loaded) if d is not None else None for d in self._data())
        if versions == self._versions:
            return
        self._versions = versions
        for series, title, selector in SERIES:
            traces = compare_traces(self.model, self.jobs, series)
            chart = self.query_one(selector, Chart)
            chart.empty_text = "loading…" if not all(v and v[1] for v in versions) else f"no {title} yet"
            steps = [t.steps for t in traces]
            x_range = (min(float(s[0]) for s in steps), max(float(s[-1]) for s in steps)) if steps else None
            chart.set_data(traces, versions, x_range=x_range, title=title)

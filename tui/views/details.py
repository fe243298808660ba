"""Job details: what `dallm show` prints (the row, peak memory, checkpoints, state history, last
metrics) and the resolved config (the file with its `--set` values applied, as the daemon runs it),
with an export (`e`) of the config as TOML, ready to resubmit, and of the detail as JSON."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import tomli_w
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from dallm.protocol import JobDetail, format_seconds, peak_memory_text, phase_text
from dallm.protocol.labels import figures_lines
from dallm.tui.connection import Connection, ConnectionLost


def without_none(value: object) -> object:
    """TOML has no null: keys whose value is None are left out (the config's defaults)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value if v is not None]
    return value


def config_toml(detail: JobDetail) -> str:
    return tomli_w.dumps(without_none(detail.config))  # type: ignore[arg-type]


def detail_text(detail: JobDetail, now: float) -> Text:
    """The summary part of `dallm show`, as styled text."""
    s = detail.summary
    t = Text()
    t.append(f"job {s.id} {s.name}: ", style="bold")
    t.append(s.state, style="bold red" if s.state == "failed" else "bold")
    if s.reason:
        t.append(f" ({s.reason})")
    t.append(f"\n  step {s.step}/{s.total_steps}  priority {s.priority}  device {s.device or '-'}")
    t.append(f"  attempts {s.attempts}")
    phase = phase_text(s, now)
    if phase:
        t.append(f"\n  phase {phase}")
    t.append(f"\n  output {s.out_dir or '-'}")
    data = detail.config.get("data", {})
    if isinstance(data, dict) and data.get("dir"):
        t.append(f"\n  data {data['dir']}")
    t.append(f"\n  peak memory {peak_memory_text(s)}")
    if s.history_gap:
        t.append(f"\n  history incomplete: {s.history_gap}", style="yellow")
    if s.turning_point is not None:
        t.append(f"\n  turning point: step {s.turning_point}")
    if s.result_step is not None:
        t.append(f"\n  result: step {s.result_step}")
    for line in figures_lines(s):  # the validation figures with their spread named, and the choice
        t.append(f"\n  {line}")
    if detail.last_metrics:
        t.append("\n  last metrics: " + "  ".join(f"{k}={v:.5g}" for k, v in detail.last_metrics.items()))
    if detail.checkpoints:
        marks = [f"{c.step}{'*' if c.superseded else ''}" for c in detail.checkpoints]
        sup = "  (* superseded)" if any(c.superseded for c in detail.checkpoints) else ""
        t.append(f"\n  checkpoints: {', '.join(marks)}{sup}")
    t.append("\n\nstate history", style="bold")
    for tr in detail.transitions:
        when = datetime.fromtimestamp(tr.t).strftime("%Y-%m-%d %H:%M:%S")
        t.append(f"\n  {when}  {tr.from_state or '-':>13} -> {tr.to_state:<13} {tr.reason}")
    if len(detail.transitions) > 1:
        span = detail.transitions[-1].t - detail.transitions[0].t
        t.append(f"\n  ({format_seconds(span)} from first to last)", style="dim")
    return t


def export_detail(detail: JobDetail, folder: Path) -> tuple[Path, Path]:
    """Write `job-<id>-<name>.toml` (the config: `dallm submit` takes it back) and `.json` (all of
    the detail, as `dallm show --json`). Returns both paths."""
    stem = folder / f"job-{detail.summary.id}-{detail.summary.name}"
    toml_path, json_path = stem.with_suffix(".toml"), stem.with_suffix(".json")
    toml_path.write_text(config_toml(detail))
    json_path.write_text(json.dumps(detail.model_dump(mode="json"), indent=2) + "\n")
    return toml_path, json_path


class DetailsScreen(Screen[None]):
    """One job in full; `e` exports it to the folder the TUI was started in."""

    BINDINGS = [
        Binding("escape,q,d", "app.pop_screen", "Back"),
        Binding("e", "export", "Export"),
    ]

    class Loaded(Message):
        def __init__(self, detail: JobDetail | None, error: str = "") -> None:
            super().__init__()
            self.detail, self.error = detail, error

    def __init__(self, connection: Connection, job: int, export_dir: Path | None = None) -> None:
        super().__init__()
        self.connection = connection
        self.job = job
        self.export_dir = export_dir or Path.cwd()
        self.detail: JobDetail | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="details"):
            yield Static(Text(f"loading job {self.job}…", style="dim italic"), id="details-summary")
            yield Static(Text("resolved config (with --set values)", style="bold"), id="details-config-title")
            yield Static(id="details-config")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.run_worker(self._load, thread=True, exit_on_error=False)

    def _load(self) -> None:
        try:
            self.post_message(self.Loaded(self.connection.show(self.job)))
        except ConnectionLost as e:
            self.post_message(self.Loaded(None, f"not loaded: {e}"))
        except Exception as e:  # the daemon refused (DaemonError): one line
            self.post_message(self.Loaded(None, f"{type(e).__name__}: {e}"))

    def on_details_screen_loaded(self, message: Loaded) -> None:
        summary = self.query_one("#details-summary", Static)
        if message.detail is None:
            summary.update(Text(message.error, style="bold red"))
            return
        self.detail = message.detail
        summary.update(detail_text(message.detail, time.time()))
        self.query_one("#details-config", Static).update(Text(config_toml(message.detail)))

    def action_export(self) -> None:
        if self.detail is None:
            self.notify("nothing to export yet: the detail has not come", severity="warning")
            return
        try:
            toml_path, json_path = export_detail(self.detail, self.export_dir)
        except OSError as e:
            self.notify(f"export failed: {e.strerror}: {e.filename}", severity="error")
            return
        self.notify(f"config: {toml_path}\ndetail: {json_path}", title=f"job {self.job} exported")

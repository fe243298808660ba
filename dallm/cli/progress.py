"""A rich progress bar for foreground training, fed by the same events a daemon would receive."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dallm.protocol import (
    CheckpointEvent,
    FinishedEvent,
    JobEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    RolledBackEvent,
    StartedEvent,
    TurningPointEvent,
)


class ProgressEmit:
    """An `emit` that draws step, loss, CS-Fluctuation and ETA, then passes events on to `inner`."""

    def __init__(self, total: int, inner: Callable[[JobEvent], None] | None = None) -> None:
        self.inner = inner
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.fields[phase]:<13}"),  # what a bar that stands still waits for
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  cs-fluct {task.fields[fluct]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, loss="-", fluct="-", phase="loading")
        self.started = False  # drawn from the first event: a job refused before it starts draws nothing

    def __call__(self, event: JobEvent) -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        if isinstance(event, StartedEvent):
            self.bar.update(self.task, completed=event.start_step, total=event.total_steps)
            self.bar.reset(self.task, completed=event.start_step, total=event.total_steps)
        elif isinstance(event, MetricsEvent) and "loss" in event.values:
            v = event.values
            fluct = f"{v['cs_fluct']:.3g}" if "cs_fluct" in v else "-"
            self.bar.update(self.task, completed=event.step, loss=f"{v['loss']:.4f}", fluct=fluct)
        elif isinstance(event, RolledBackEvent):
            self.bar.update(self.task, completed=event.step)
        elif isinstance(event, PhaseEvent):
            self.bar.update(self.task, phase=event.phase)
        elif isinstance(event, LogEvent) and event.level in ("warning", "error"):
            self.console.print(f"[yellow]{event.level}:[/] {event.message}")
        elif isinstance(event, LogEvent | TurningPointEvent | CheckpointEvent) and not isinstance(
            event, LogEvent
        ):
            pass
        elif isinstance(event, LogEvent):
            self.console.print(event.message)
        elif isinstance(event, FinishedEvent):
            self.close()
        if self.inner is not None:
            self.inner(event)

    def close(self) -> None:
        if self.started:
            self.bar.stop()

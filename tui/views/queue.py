"""Queue management: which jobs the table shows and in what order (filter by state or name, hide
finished jobs, sort), and the one-line bar that edits the name filter (`/`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Input, Static

from dallm.protocol import JOB_STATES, TERMINAL_STATES, JobSummary
from dallm.tui.widgets import run_order

# The state filter cycles through these (None: every state).
STATE_CYCLE: tuple[str | None, ...] = (
    None,
    "running",
    "queued",
    "failed",
    "finished",
    "stopped",
    "stopped-early",
)
SORTS: dict[str, Callable[[JobSummary], tuple]] = {
    "run order": run_order,
    "name": lambda r: (r.name.lower(), r.id),
    "state": lambda r: (JOB_STATES.index(r.state), r.id),
    "newest": lambda r: (-r.created, -r.id),
}
SORT_NAMES = tuple(SORTS)


@dataclass(frozen=True)
class QueueView:
    """What the user asked the queue to show."""

    search: str = ""  # part of the name or the id, case-insensitive
    state: str | None = None
    hide_finished: bool = False
    sort: str = "run order"

    def rows(self, jobs: Iterable[JobSummary]) -> list[JobSummary]:
        """The jobs to show, in the order to show them."""
        needle = self.search.strip().lower()
        out = [
            r
            for r in jobs
            if (not needle or needle in r.name.lower() or needle == str(r.id))
            and (self.state is None or r.state == self.state)
            and not (self.hide_finished and r.state in TERMINAL_STATES)
        ]
        return sorted(out, key=SORTS[self.sort])

    def next_state(self) -> QueueView:
        i = STATE_CYCLE.index(self.state) if self.state in STATE_CYCLE else 0
        return replace(self, state=STATE_CYCLE[(i + 1) % len(STATE_CYCLE)])

    def next_sort(self) -> QueueView:
        return replace(self, sort=SORT_NAMES[(SORT_NAMES.index(self.sort) + 1) % len(SORT_NAMES)])

    def describe(self) -> str:
        """One line for the bar: what is filtered, "" when the queue is shown whole."""
        parts = []
        if self.search:
            parts.append(f"name ~ {self.search!r}")
        if self.state is not None:
            parts.append(f"state = {self.state}")
        if self.hide_finished:
            parts.append("finished hidden")
        if self.sort != "run order":
            parts.append(f"sorted by {self.sort}")
        return " · ".join(parts)


class QueueBar(Horizontal):
    """Under the queue: the active filter, and the search box while `/` edits it."""

    view: reactive[QueueView] = reactive(QueueView, always_update=True)
    shown_count: reactive[tuple[int, int]] = reactive((0, 0))  # (shown, all)

    class SearchChanged(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class SearchClosed(Message):
        """Enter or Escape left the search box (the filter stays)."""

    def compose(self) -> ComposeResult:
        yield Static(id="queue-filter")
        yield Input(placeholder="search jobs by name or id (enter: keep, esc: clear)", id="queue-search")

    def on_mount(self) -> None:
        self.query_one(Input).display = False
        self.display = False

    def _refresh_line(self) -> None:
        line = self.view.describe()
        shown, total = self.shown_count
        text = Text.assemble(("filter ", "bold"), (line, "cyan"), (f"  ({shown} of {total} jobs)", "dim"))
        self.query_one("#queue-filter", Static).update(text)
        self.display = bool(line) or self.query_one(Input).display

    def watch_view(self, view: QueueView) -> None:
        self._refresh_line()

    def watch_shown_count(self, count: tuple[int, int]) -> None:
        self._refresh_line()

    def open_search(self) -> None:
        box = self.query_one(Input)
        box.value = self.view.search
        box.display = True
        self.display = True
        # Focus once laid out: a widget that was hidden is not in the focus chain until then, and
        # keys typed meanwhile would reach the app's bindings (s: stop) instead of the box.
        self.call_after_refresh(box.focus)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.SearchChanged(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._close()

    def on_key(self, event) -> None:
        if event.key == "escape" and self.query_one(Input).display:
            event.stop()
            self.post_message(self.SearchChanged(""))
            self._close()

    def _close(self) -> None:
        self.query_one(Input).display = False
        self._refresh_line()
        self.post_message(self.SearchClosed())

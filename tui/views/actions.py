"""The app's actions for the views (tui/views/) and queue management. `ViewActions` is a base
class of the app (tui/app.py's `DallmApp`), on top of `JobActions` (tui/job_actions.py: the
selected row, sending), with what else it uses of the app declared under TYPE_CHECKING: this module
does not import the app (tui/app.py keeps the queue, the selected job and the feed)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from textual.app import SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from dallm.tui.connection import Action
from dallm.tui.job_actions import JobActions
from dallm.tui.views.clone import CloneScreen
from dallm.tui.views.compare import CompareScreen
from dallm.tui.views.details import DetailsScreen
from dallm.tui.views.logs import LogTailScreen
from dallm.tui.views.queue import QueueBar, QueueView
from dallm.tui.views.resources import ResourcesScreen
from dallm.tui.widgets import JobTable


class ViewActions(JobActions):
    """Open the views (compare, logs, details, resources, clone) and shape the queue (search,
    filter, sort, marks)."""

    if TYPE_CHECKING:  # provided by DallmApp
        marked: list[int]
        listed: bool
        queue_view: QueueView

        def show_queue(self) -> None: ...

    def action_mark(self) -> None:
        row = self.selected_row("mark")
        if row is None:
            return
        if row.id in self.marked:
            self.marked.remove(row.id)
        else:
            self.marked.append(row.id)
            self.feed.want_history(row.id)  # the compare view draws its curves
        self.show_queue()

    def action_compare(self) -> None:
        jobs = [j for j in self.marked if j in self.model.jobs]
        if len(jobs) < 2:
            self.notify("mark two or more jobs with space first, then v", severity="warning")
            return
        for job in jobs:
            self.feed.want_history(job)
        self.push_screen(CompareScreen(self.model, jobs, self.connection))

    def action_logs(self) -> None:
        row = self.selected_row("show the log of")
        if row is not None:
            self.push_screen(LogTailScreen(self.connection, row.id, row.name))

    def action_details(self) -> None:
        row = self.selected_row("describe")
        if row is not None:
            self.push_screen(DetailsScreen(self.connection, row.id))

    def action_resources(self) -> None:
        self.push_screen(ResourcesScreen(self.connection, self.model))

    def action_clone(self) -> None:
        row = self.selected_row("clone")
        if row is None:
            return

        def answered(overrides: list[str] | None) -> None:
            if overrides is not None:
                self.send(Action("clone", row.id, overrides=tuple(overrides)))

        self.push_screen(CloneScreen(row.id, row.name), answered)

    def action_search(self) -> None:
        self.query_one(QueueBar).open_search()

    def on_queue_bar_search_changed(self, message: QueueBar.SearchChanged) -> None:
        self.queue_view = replace(self.queue_view, search=message.text)

    def on_queue_bar_search_closed(self, message: QueueBar.SearchClosed) -> None:
        self.query_one(JobTable).focus()

    def action_filter_state(self) -> None:
        self.queue_view = self.queue_view.next_state()

    def action_sort(self) -> None:
        self.queue_view = self.queue_view.next_sort()

    def action_hide_finished(self) -> None:
        self.queue_view = replace(self.queue_view, hide_finished=not self.queue_view.hide_finished)

    def watch_queue_view(self, view: QueueView) -> None:
        self.query_one(QueueBar).view = view
        if self.listed:
            self.show_queue()

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            if isinstance(binding, Binding) and binding.action not in ("quit", "help"):
                help_text = f"key {binding.key_display or binding.key}"
                yield SystemCommand(binding.description, help_text, partial(self.run_action, binding.action))

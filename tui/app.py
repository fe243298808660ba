"""`dallm-tui`: the jobs of one dallm daemon, live, with stop and rollback from the keyboard."""

from __future__ import annotations

import argparse
import gc
import sys
import time

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive, var
from textual.timer import Timer
from textual.widgets import Footer

from dallm.protocol import JobStateEvent, JobSummary, phase_text
from dallm.tui import images
from dallm.tui.chart_panel import Charts
from dallm.tui.connection import Connection, open_connection
from dallm.tui.feed import DaemonFeed
from dallm.tui.model import HistoryView, Model
from dallm.tui.screens import HelpScreen
from dallm.tui.thumbnail import Thumbnail
from dallm.tui.views.actions import ViewActions
from dallm.tui.views.queue import QueueBar, QueueView
from dallm.tui.widgets import ActivityLog, CheckpointList, ConnectionBar, JobHeader, JobTable

ACTIVE_STATES = frozenset({"running", "stopping"})
QUEUE_REFRESH_S = 0.5  # the queue table is redrawn at most this often for metrics alone
PHASE_TICK_S = 1.0  # the time in a phase counts on while the engine emits nothing (an evaluation)
EMPTY_QUEUE = "The queue is empty. Submit a job with: dallm submit CONFIG.toml"
WAITING = ("waiting for the daemon…", "dim italic")


class DallmApp(ViewActions, App[None]):
    """The dashboard. All daemon traffic goes through `DaemonFeed` (a thread) and `Connection.send`
    (thread workers); the handlers here update the model, then the reactive attributes the
    selected job's widgets are bound to (`shown_row`, `shown_history`, `header_note`).
    Acting on jobs: job_actions.py; the views and the queue's filter: views/actions.py."""

    CSS_PATH = "app.tcss"
    TITLE = "dallm"
    # ctrl+p: Textual's palette, with every view and action below; not in the footer (no room at 80).
    COMMAND_PALETTE_BINDING = "ctrl+p"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("s", "stop", "Stop"),
        Binding("r", "rollback", "Rollback"),
        Binding("c", "checkpoint", "Ckpt now"),
        # Cancel kills the job: a shifted key, never next to a harmless one, and it asks first.
        Binding("X", "cancel_job", "Cancel", key_display="X"),
        Binding("plus,equals_sign", "priority(1)", "Pri+", key_display="+"),
        Binding("minus", "priority(-1)", "Pri-", key_display="-"),
        Binding("t", "toggle_charts", "Charts"),
        Binding("left_square_bracket", "older_sample", "Older", key_display="["),
        Binding("right_square_bracket", "newer_sample", "Newer", key_display="]"),
        # Views and queue management: in help, the palette and docs/tui.md; the footer has no room.
        Binding("space", "mark", "Mark", show=False),
        Binding("v", "compare", "Compare", show=False),
        Binding("l", "logs", "Logs", show=False),
        Binding("d", "details", "Details", show=False),
        Binding("u", "resources", "Resources", show=False),
        Binding("slash", "search", "Search", key_display="/", show=False),
        Binding("f", "filter_state", "Filter state", show=False),
        Binding("o", "sort", "Sort", show=False),
        Binding("h", "hide_finished", "Hide finished", show=False),
        Binding("C", "clone", "Clone", key_display="C", show=False),
        Binding("T", "toggle_theme", "Theme", key_display="T", show=False),
        Binding("g", "gallery", "Gallery"),
        # Charts (in the help, not the footer: it has no room at 80 columns).
        Binding("z", "zoom(0.5)", "Zoom in", show=False),
        Binding("Z", "zoom(2.0)", "Zoom out", show=False, key_display="Z"),
        Binding("less_than_sign", "pan(-1)", "Pan left", show=False, key_display="<"),
        Binding("greater_than_sign", "pan(1)", "Pan right", show=False, key_display=">"),
        Binding("comma", "cursor(-1)", "Cursor left", show=False, key_display=","),
        Binding("full_stop", "cursor(1)", "Cursor right", show=False, key_display="."),
        Binding("y", "log_scale", "Log y", show=False),
        Binding("e", "smoothing", "Smoothing", show=False),
        Binding("0", "reset_chart", "Whole run", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    selected: reactive[int | None] = reactive(None)
    queue_view: reactive[QueueView] = reactive(QueueView)
    # What the selected job's widgets draw (bound in `compose`). Set by `_show_selected` only while
    # the dashboard shows: an equal value redraws nothing.
    shown_row: var[JobSummary | None] = var(None)
    shown_history: var[HistoryView | None] = var(None)
    header_note: var[tuple[str, str]] = var(WAITING)  # (text, style) in the header without a job

    def __init__(
        self,
        connection: Connection,
        *,
        images_mode: images.ImageMode = "halfblock",
        poll_timeout: float = 0.25,
        backoff: tuple[float, float] = (0.5, 5.0),
        initial_job: int | None = None,
    ) -> None:
        super().__init__()
        self.initial_job = initial_job
        self.connection = connection
        self.images_mode = images_mode
        self.model = Model()
        self.feed = DaemonFeed(connection, self.post_message, poll_timeout=poll_timeout, backoff=backoff)
        self.was_connected = False
        self.listed = False
        # The user chose the selected job (keys, mouse): it stays chosen. Otherwise the selection
        # follows the job that starts when the selected one is not running.
        self.user_picked = False
        self._moving = False
        self._queue_timer: Timer | None = None
        self.marked: list[int] = []  # jobs marked (space) for the compare view, in marking order

    def compose(self) -> ComposeResult:
        yield ConnectionBar(id="connection")
        yield JobTable(id="jobs")
        yield QueueBar(id="queue-bar")
        yield JobHeader(id="job-header").data_bind(row=DallmApp.shown_row, note=DallmApp.header_note)
        history = DallmApp.shown_history
        with Horizontal(id="main"):
            yield Charts(id="charts").data_bind(history=history)
            with Vertical(id="side"):
                yield Thumbnail(self.images_mode, id="thumbnail").data_bind(history=history)
                yield CheckpointList(id="checkpoints").data_bind(history=history)
        yield ActivityLog(id="log").data_bind(history=history)
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one(ConnectionBar).endpoint = self.connection.endpoint
        self.query_one(JobTable).focus()
        self.run_worker(self.feed.run, thread=True, name="daemon-feed", exit_on_error=False)
        self.set_interval(PHASE_TICK_S, self._tick_phases)
        self.screen_change_signal.subscribe(self, self._on_screen_change)

    def on_unmount(self) -> None:
        self.feed.stop()

    # -- the daemon feed ------------------------------------------------------------------------

    def on_daemon_feed_connected(self, message: DaemonFeed.Connected) -> None:
        bar = self.query_one(ConnectionBar)
        bar.connected = True
        if self.was_connected:
            self.notify("reconnected; history backfilled", title="daemon")
        self.was_connected = True
        self.query_one(ActivityLog).note(f"connected to {message.endpoint}")

    def on_daemon_feed_disconnected(self, message: DaemonFeed.Disconnected) -> None:
        bar = self.query_one(ConnectionBar)
        if bar.connected:
            self.notify(message.error, title="daemon disconnected", severity="error")
            self.query_one(ActivityLog).note(f"disconnected: {message.error}", style="bold red")
        bar.connected = False
        bar.detail = f"retrying in {message.retry_in:g}s · {message.error}"

    def on_daemon_feed_jobs_listed(self, message: DaemonFeed.JobsListed) -> None:
        first = not self.listed
        self.model.set_jobs(message.jobs)
        self.listed = True
        self.show_queue()
        if first:
            ids = [j.id for j in message.jobs]
            running = [j.id for j in message.jobs if j.state == "running"]
            start = self.initial_job if self.initial_job in ids else (running[0] if running else None)
            if start is not None and start != self.selected:
                self._select(start)

    def _select(self, job: int) -> None:
        """Move the cursor to `job` for the user (the selection follows; it is not a user's pick)."""
        table = self.query_one(JobTable)
        row = table.get_row_index(str(job))
        if row != table.cursor_row:  # only a move posts a highlight (which clears `_moving`)
            self._moving = True
            table.move_cursor(row=row)

    def on_daemon_feed_history_loaded(self, message: DaemonFeed.HistoryLoaded) -> None:
        self.model.apply_history(message.job, message.envelopes)
        # What is alive now (widgets, the model, caches) lives as long as the app: out of the
        # cyclic collector's full scans, which otherwise walk it all during a live frame (bench_tui
        # saw 1.2 s full collections at load 9). Refcounting still frees these objects.
        gc.freeze()
        if message.job == self.selected:
            self._show_selected()

    def on_daemon_feed_events_received(self, message: DaemonFeed.EventsReceived) -> None:
        touched = self.model.apply_live(message.envelopes)
        states = [e.event for e in message.envelopes if isinstance(e.event, JobStateEvent)]
        if states:
            self.show_queue()
            self._follow(states)
        elif self._queue_timer is None:
            # Step counters need no 60 fps: redrawing the table costs more than both charts.
            self._queue_timer = self.set_timer(QUEUE_REFRESH_S, self.show_queue)
        if self.selected in touched:
            self._show_selected()

    def _follow(self, states: list[JobStateEvent]) -> None:
        selected = self.model.jobs.get(self.selected) if self.selected is not None else None
        if selected is not None and selected.state in ACTIVE_STATES:
            return
        if selected is not None and any(
            ev.job.id == selected.id and ev.prev_state in ACTIVE_STATES for ev in states
        ):
            self.user_picked = False  # the job the user watched ended: follow what runs next
        started = [ev.job.id for ev in states if ev.job.state == "running" and ev.prev_state == "queued"]
        if started and not self.user_picked and started[-1] in self.model.jobs:
            self._select(started[-1])

    # -- showing --------------------------------------------------------------------------------

    def _tick_phases(self) -> None:
        now = time.time()
        if self._queue_timer is None and any(phase_text(r, now) for r in self.model.jobs.values()):
            self.show_queue()
            for header in self.query(JobHeader) if not self._covered() else ():
                header.redraw()  # the time in the selected job's phase counts on

    def _covered(self) -> bool:
        """An opaque screen (the gallery, a view) is over the dashboard: nothing of it shows, so it
        is drawn when it comes back. Textual forwards a background screen's changes to the screen
        on top as repaints of the same regions: the gallery re-sent its twelve Sixel images several
        times a second for charts nobody saw."""
        stack = self.screen_stack
        return len(stack) > 1 and stack[-1].styles.background.a == 1

    def _on_screen_change(self, screen: object) -> None:
        if screen is self.screen_stack[0]:
            # Back on the dashboard: repaint every cell. Textual rewrites only what changed while it
            # was covered, and Sixel pixels of the screen that was on top (the gallery's images)
            # stay wherever no text is written over them (seen in xterm).
            self.screen.refresh()
        # What changed while the dashboard was covered: the widgets get it now (unchanged: no redraw).
        self.show_queue()

    def show_queue(self) -> None:
        if self._queue_timer is not None:
            self._queue_timer.stop()
            self._queue_timer = None
        if not self.query(JobTable):  # a timer that fired while the app closes: the widgets are gone
            return
        if self._covered():
            return  # drawn when the dashboard is back (`_on_screen_change`)
        table = self.query_one(JobTable)
        rows = self.queue_view.rows(self.model.jobs.values())
        table.show_jobs(rows, set(self.marked))
        self.query_one(QueueBar).shown_count = (len(rows), len(self.model.jobs))
        shown = {r.id for r in rows}
        if self.selected is not None and table.current_job != self.selected and self.selected in shown:
            self._select(self.selected)  # the rows were reordered: keep the selected job under the cursor
        if self.selected not in shown:
            self.selected = table.current_job
        self._show_selected()  # the selected row may have changed (or the queue emptied)

    def watch_selected(self, job: int | None) -> None:
        if job is not None:
            data = self.model.data_for(job)
            if not data.loaded:
                self.feed.want_history(job)
        self._show_selected()

    def _show_selected(self) -> None:
        """Hand the selected job to the widgets bound to it, unless an opaque screen covers them:
        they get it when the dashboard is back (`_on_screen_change`)."""
        if self._covered():
            return
        job = self.selected
        self.shown_row = self.model.jobs.get(job) if job is not None else None
        self.shown_history = self.model.history(job)
        if not self.listed:
            self.header_note = WAITING
        elif not self.model.jobs:
            self.header_note = (EMPTY_QUEUE, "italic")
        else:
            self.header_note = ("no job selected", "dim")

    def on_job_table_job_highlighted(self, message: JobTable.JobHighlighted) -> None:
        if self._moving:
            self._moving = False
        elif message.job != self.selected:
            self.user_picked = True
        self.selected = message.job

    def action_toggle_charts(self) -> None:
        charts = self.query_one(Charts)
        charts.view = "loss" if charts.view == "fluct" else "fluct"

    def action_older_sample(self) -> None:
        self.query_one(Thumbnail).older()

    def action_newer_sample(self) -> None:
        self.query_one(Thumbnail).newer()

    def action_zoom(self, factor: float) -> None:
        self.query_one(Charts).zoom(factor)

    def action_pan(self, direction: int) -> None:
        self.query_one(Charts).pan(direction)

    def action_cursor(self, direction: int) -> None:
        self.query_one(Charts).move_cursor(direction)

    def action_log_scale(self) -> None:
        self.query_one(Charts).toggle_log()

    def action_smoothing(self) -> None:
        weight = self.query_one(Charts).cycle_smoothing()
        self.notify(f"smoothing {weight:g}" if weight else "smoothing off", title="charts")

    def action_reset_chart(self) -> None:
        self.query_one(Charts).reset()

    def action_gallery(self) -> None:
        row = self.selected_row("show samples of")
        if row is None:
            return
        from dallm.tui.gallery import GalleryScreen

        data = self.model.data.get(row.id)
        self.push_screen(GalleryScreen(row, data, self.images_mode))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


# -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dallm-tui", description=__doc__)
    p.add_argument(
        "--connect", metavar="ENDPOINT", help="the daemon's control endpoint (default: the local daemon)"
    )
    p.add_argument(
        "--home", metavar="DIR", help="the daemon's home (default: $DALLM_HOME or the user data dir)"
    )
    p.add_argument(
        "--images",
        default="auto",
        choices=images.IMAGE_MODES,
        help="how to draw sample thumbnails (default: auto-detect, half-blocks when unsure)",
    )
    p.add_argument(
        "--job", metavar="ID", type=int, help="the job to show first (default: the first running one)"
    )
    p.add_argument(
        "--demo", action="store_true", help="show made-up jobs from a fake daemon (no daemon needed)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = images.resolve_mode(args.images)
    if args.demo:
        from dallm.tui.demo import DemoRunner, demo_connection  # the demo's jobs only when asked

        conn = demo_connection()
        runner = DemoRunner(conn)
        runner.start()
        DallmApp(conn, images_mode=mode).run()
        runner.stop()
        return 0
    try:
        conn = open_connection(connect=args.connect, home=args.home)
    except Exception as e:
        print(f"dallm-tui: {e}", file=sys.stderr)
        return 1
    DallmApp(conn, images_mode=mode, initial_job=args.job).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

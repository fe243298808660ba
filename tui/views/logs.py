"""The worker's log (its stdout and stderr: prints, warnings, tracebacks), like k9s `l`: the tail
first, then new lines while following (`f`), and `/` to show only the lines that match."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Input, RichLog, Static

from dallm.protocol import WorkerLogReply
from dallm.tui.connection import Connection, ConnectionLost

FOLLOW_S = 1.0  # how often a followed log asks the daemon for new lines
MAX_LINES = 5000  # kept in the view (the daemon's tail is 256 KiB)
TRACEBACK_START = "Traceback (most recent call last):"


def line_styles(lines: list[str]) -> list[str]:
    """A style per line: a traceback red from its first line to the exception line that ends it
    (the first line after it that is not indented), errors and warnings by their words."""
    out = []
    in_tb = False
    for line in lines:
        if line.startswith(TRACEBACK_START):
            in_tb = True
            out.append("red")
        elif in_tb and (line.startswith(" ") or not line.strip()):
            out.append("red")
        elif in_tb:
            in_tb = line.startswith("During handling") or line.startswith("The above exception")
            out.append("red" if in_tb else "bold red")
        else:
            lowered = line.lower()
            out.append("bold red" if "error" in lowered else "yellow" if "warning" in lowered else "")
    return out


class LogTailScreen(Screen[None]):
    """One job's worker log. Reads go through the connection in thread workers."""

    BINDINGS = [
        Binding("escape,q,l", "close", "Back"),
        Binding("f", "toggle_follow", "Follow"),
        Binding("slash", "search", "Search", key_display="/"),
        Binding("G", "end", "End"),
    ]

    follow: reactive[bool] = reactive(True)
    search: reactive[str] = reactive("")

    class Read(Message):
        """The daemon answered a read of the log (or could not be asked: `error`)."""

        def __init__(self, reply: WorkerLogReply | None, error: str = "") -> None:
            super().__init__()
            self.reply, self.error = reply, error

    def __init__(self, connection: Connection, job: int, name: str) -> None:
        super().__init__()
        self.connection = connection
        self.job, self.job_name = job, name
        self.log_lines: list[str] = []
        self.read_at: int | None = None  # None until the tail came: then where the next read starts
        self.log_path = ""
        self.read_error = ""

    def compose(self) -> ComposeResult:
        yield Static(id="log-title")
        yield RichLog(max_lines=MAX_LINES, wrap=False, markup=False, id="log-text")
        yield Input(placeholder="show lines containing… (enter: keep, esc: clear)", id="log-search")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one(Input).display = False
        self._title()
        self._read()
        self.set_interval(FOLLOW_S, self._tick)

    # -- reading --------------------------------------------------------------------------------

    def _tick(self) -> None:
        if self.follow and self.read_at is not None:
            self._read()

    def _read(self) -> None:
        offset = self.read_at
        self.run_worker(lambda: self._read_blocking(offset), thread=True, group="log-read", exclusive=True)

    def _read_blocking(self, offset: int | None) -> None:
        try:
            reply = self.connection.worker_log(self.job, offset)
        except ConnectionLost as e:
            self.post_message(self.Read(None, f"not read: {e}"))
        except Exception as e:  # the daemon refused (DaemonError): say so, keep what is shown
            self.post_message(self.Read(None, f"{type(e).__name__}: {e}"))
        else:
            self.post_message(self.Read(reply))

    def on_log_tail_screen_read(self, message: Read) -> None:
        self.read_error = message.error
        reply = message.reply
        if reply is not None:
            self.log_path = reply.path
            first = self.read_at is None
            if not first and reply.start < (self.read_at or 0):  # the file was started anew
                self.log_lines, first = [], True
            self.read_at = reply.end
            new = reply.text.splitlines()
            self.log_lines = (self.log_lines + new)[-MAX_LINES:]
            if first:
                self._render_all()
            elif new:
                self._append(len(self.log_lines) - len(new))
        self._title()

    # -- showing --------------------------------------------------------------------------------

    def _styled(self, start: int) -> list[Text]:
        """Lines from `start` on, styled, the search filter applied."""
        styles = line_styles(self.log_lines)
        needle = self.search.lower()
        out = []
        for line, style in zip(self.log_lines[start:], styles[start:], strict=True):
            if needle and needle not in line.lower():
                continue
            text = Text(line, style=style)
            if needle:
                text.highlight_words([self.search], style="reverse", case_sensitive=False)
            out.append(text)
        return out

    def _render_all(self) -> None:
        log = self.query_one(RichLog)
        log.clear()
        for text in self._styled(0):
            log.write(text, scroll_end=self.follow)

    def _append(self, start: int) -> None:
        log = self.query_one(RichLog)
        for text in self._styled(start):
            log.write(text, scroll_end=self.follow)

    def _title(self) -> None:
        text = Text.assemble((f"worker log of job {self.job} ({self.job_name})", "bold"))
        if self.log_path:
            text.append(f"  {self.log_path}", style="dim")
        text.append(
            "  following" if self.follow else "  paused (f: follow)",
            style="green" if self.follow else "yellow",
        )
        if self.search:
            text.append(f"  lines with {self.search!r}", style="cyan")
        if self.read_at is not None and not self.log_lines:
            text.append("  (empty: the worker has written nothing)", style="dim italic")
        if self.read_error:
            text.append(f"  {self.read_error}", style="bold red")
        self.query_one("#log-title", Static).update(text)

    # -- keys -----------------------------------------------------------------------------------

    def watch_follow(self, follow: bool) -> None:
        if self.is_mounted:
            self._title()
            if follow:
                self.query_one(RichLog).scroll_end(animate=False)

    def watch_search(self, search: str) -> None:
        if self.is_mounted:
            self._render_all()
            self._title()

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow

    def action_end(self) -> None:
        self.query_one(RichLog).scroll_end(animate=False)

    def action_search(self) -> None:
        box = self.query_one(Input)
        box.value = self.search
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.search = event.value

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._close_search()

    def _close_search(self) -> None:
        box = self.query_one(Input)
        box.display = False
        self.query_one(RichLog).focus()

    def action_close(self) -> None:
        box = self.query_one(Input)
        if box.display:  # escape in the search box: clear the filter first
            self.search = ""
            self._close_search()
            return
        self.app.pop_screen()

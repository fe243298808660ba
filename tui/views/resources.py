"""Resources, like nvitop/btop: the daemon's machine (host CPU and memory), each GPU (utilisation,
memory) and each running job's worker (CPU, resident memory, GPU memory), with every job's peak
memory as its worker reported it. The daemon samples (the TUI may run elsewhere); this view asks
every REFRESH_S seconds while it is open."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from dallm.protocol import ResourcesReply
from dallm.tui.connection import Connection, ConnectionLost
from dallm.tui.model import Model

REFRESH_S = 2.0
BAR = 20  # cells of a usage bar


def bar(fraction: float, width: int = BAR) -> Text:
    """A usage bar: green, yellow past 70%, red past 90%."""
    f = min(max(fraction, 0.0), 1.0)
    full = round(f * width)
    style = "red" if f > 0.9 else "yellow" if f > 0.7 else "green"
    return Text.assemble(("█" * full, style), ("░" * (width - full), "dim"))


def mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def host_text(reply: ResourcesReply) -> Text:
    h = reply.host
    t = Text.assemble(
        ("CPU ", "bold"), bar(h.cpu_percent / 100), f" {h.cpu_percent:5.1f}% of {h.cpu_count} cores"
    )
    t.append("\n")
    mem = h.mem_used_mb / h.mem_total_mb if h.mem_total_mb else 0.0
    t.append_text(Text.assemble(("RAM ", "bold"), bar(mem), f" {mib(h.mem_used_mb)} / {mib(h.mem_total_mb)}"))
    for g in reply.gpus:
        util = "n/a" if g.util_percent is None else f"{g.util_percent:3.0f}%"
        t.append(f"\nGPU{g.index} ", style="bold")
        t.append_text(bar((g.util_percent or 0) / 100))
        t.append(f" {util}  mem ")
        t.append_text(bar(g.mem_used_mb / g.mem_total_mb if g.mem_total_mb else 0.0, 12))
        t.append(f" {mib(g.mem_used_mb)} / {mib(g.mem_total_mb)}  {g.name}")
    if reply.gpu_note:
        t.append(f"\n{reply.gpu_note}", style="dim italic")
    return t


class ResourcesScreen(Screen[None]):
    """Host and GPU bars on top, a row per job below (running ones live, all with their peak)."""

    BINDINGS = [Binding("escape,q,u", "app.pop_screen", "Back")]
    COLUMNS = (("job", "Job"), ("name", "Name"), ("state", "State"), ("device", "Device"), ("cpu", "CPU %"),
               ("rss", "RSS"), ("gpu", "GPU mem"), ("peak", "Peak RSS"), ("peak_gpu", "Peak GPU"))  # fmt: skip

    class Sampled(Message):
        def __init__(self, reply: ResourcesReply | None, error: str = "") -> None:
            super().__init__()
            self.reply, self.error = reply, error

    def __init__(self, connection: Connection, model: Model) -> None:
        super().__init__()
        self.connection = connection
        self.model = model  # the app's (kept current by its daemon feed): names, states, peaks

    def compose(self) -> ComposeResult:
        yield Static(Text("asking the daemon…", style="dim italic"), id="resources-host")
        yield DataTable(id="resources-jobs", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in self.COLUMNS:
            table.add_column(label, key=key)
        self._sample()
        self.set_interval(REFRESH_S, self._sample)

    def _sample(self) -> None:
        self.run_worker(self._sample_blocking, thread=True, group="resources", exclusive=True)

    def _sample_blocking(self) -> None:
        try:
            self.post_message(self.Sampled(self.connection.resources()))
        except ConnectionLost as e:
            self.post_message(self.Sampled(None, f"not sampled: {e}"))
        except Exception as e:  # the daemon refused (an older daemon: bad_request)
            self.post_message(self.Sampled(None, f"{type(e).__name__}: {e}"))

    def on_resources_screen_sampled(self, message: Sampled) -> None:
        host = self.query_one("#resources-host", Static)
        if message.reply is None:
            host.update(Text(message.error, style="bold red"))
            return
        host.update(host_text(message.reply))
        live = {u.job: u for u in message.reply.jobs}
        table = self.query_one(DataTable)
        table.clear()
        rows = sorted(self.model.jobs.values(), key=lambda r: (r.id not in live, -r.id))
        for row in rows:
            u = live.get(row.id)
            if u is None and row.peak_rss_mb is None:
                continue  # never ran (or ran before peaks were reported): nothing to say
            table.add_row(
                str(row.id),
                row.name,
                row.state,
                u.device if u else row.device or "-",
                f"{u.cpu_percent:.0f}" if u else "-",
                mib(u.rss_mb) if u else "-",
                mib(u.gpu_mem_mb) if u else "-",
                mib(row.peak_rss_mb),
                mib(row.peak_gpu_mb),
                key=str(row.id),
            )

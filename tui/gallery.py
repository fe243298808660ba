"""The sample gallery (`g`): the base model's grid, the turning point's and the latest side by side,
full screen, every image under its prompt and seed; `[` / `]` browse the right-hand column through
the job's sample history."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from dallm.protocol import JobSummary
from dallm.tui import images
from dallm.tui.model import JobData, Sample
from dallm.tui.thumbnail import SampleGrid

REFRESH_S = 1.0  # new samples or a new turning point show within this


def turning_sample(samples: list[Sample], turning_point: int | None) -> Sample | None:
    """The grid made at the turning point, or the last one before it (grids are made every N steps)."""
    if turning_point is None:
        return None
    before = [s for s in samples if s.step <= turning_point]
    return before[-1] if before else None


class GalleryScreen(Screen[None]):
    DEFAULT_CSS = """
    GalleryScreen > .gallery-title { height: 1; padding: 0 1; background: $boost; }
    GalleryScreen > Horizontal { height: 1fr; }
    GalleryScreen .gallery-column { width: 1fr; padding: 0 1; border-right: vkey $panel-lighten-2; }
    GalleryScreen .column-title { height: 1; text-style: bold; }
    """

    BINDINGS = [
        Binding("escape,g,q", "close", "Back"),
        Binding("left_square_bracket", "browse(-1)", "Older", key_display="["),
        Binding("right_square_bracket", "browse(1)", "Newer", key_display="]"),
    ]

    def __init__(self, row: JobSummary, data: JobData | None, mode: images.ImageMode) -> None:
        super().__init__()
        self.row, self.data, self.mode = row, data, mode
        self.index = -1  # the right-hand column: -1 follows the latest grid
        self._shown: object = None

    def compose(self) -> ComposeResult:
        yield Static(f"samples of job {self.row.id} ({self.row.name})", classes="gallery-title")
        with Horizontal():
            for name in ("base", "turning", "latest"):
                with Vertical(classes="gallery-column", id=f"col-{name}"):
                    yield Static("", classes="column-title")
                    yield SampleGrid(self.mode)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.update()
        self.set_interval(REFRESH_S, self.update)

    def columns(self) -> list[tuple[str, str, Sample | None, str]]:
        """(column id, title, sample, text when there is none) of the three columns."""
        d = self.data
        samples = d.samples if d else []
        base = d.base_sample if d else None
        tp = d.turning_point if d else None
        turning = turning_sample(samples, tp)
        latest = samples[self.index] if self.index < len(samples) and samples else None
        where = "latest" if self.index == -1 else f"{self.index + 1}/{len(samples)}"
        return [
            ("base", "base model", base, "no base grid (sent by engines since the gallery)"),
            (
                "turning",
                f"turning point (step {tp}, grid of step {turning.step})" if turning else "turning point",
                turning,
                "no turning point yet" if tp is None else f"no grid at or before step {tp}",
            ),
            ("latest", f"{where} (step {latest.step})" if latest else "latest", latest, "no samples yet"),
        ]

    def update(self) -> None:
        cols = self.columns()
        shown = [(c, t, id(s)) for c, t, s, _ in cols]
        if shown == self._shown:
            return
        self._shown = shown
        for col, title, sample, empty in cols:
            column = self.query_one(f"#col-{col}", Vertical)
            column.query_one(".column-title", Static).update(title)
            column.query_one(SampleGrid).show(sample, empty)

    def action_browse(self, delta: int) -> None:
        n = len(self.data.samples) if self.data else 0
        if not n:
            return
        pos = (n - 1 if self.index < 0 else self.index) + delta
        self.index = -1 if pos >= n - 1 else max(pos, 0)
        self.update()

    def action_close(self) -> None:
        self.dismiss(None)

"""A line chart drawn with braille dots (2x4 per cell), one widget, no plotting dependency (it beat
textual-plotext on bench/bench_tui.py: see docs/tui.md).

Downsampling is for display only: every point is binned to its pixel column and each column draws the
span from its minimum to its maximum (joined to the previous column), so spikes survive at any zoom
and 10,000 points cost a few numpy calls. A log y-scale, error bars (KID ± std), a cursor that reads
the values at a step, and a marker on sparse series (one evaluation is a labelled point, not a lone
dot at the edge) are drawn here; zoom, pan and smoothing are the caller's (`ChartView`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.events import Click
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

# Bit of each dot in a braille cell, indexed [dy][dx].
_DOT_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.int32)
_BRAILLE = np.array([chr(0x2800 + i) for i in range(256)])
GUTTER = 8  # y labels


SPARSE = 12  # a trace with at most this many visible points gets a marker on each (evaluations)


@dataclass(frozen=True)
class Trace:
    label: str
    steps: np.ndarray
    values: np.ndarray
    color: str
    dim: bool = False  # superseded by a rollback, or the raw curve under a smoothed one: faint, no legend
    err: np.ndarray | None = None  # a spread per point (the series' _std): drawn as error bars


def ema(values: np.ndarray, weight: float, block: int = 256) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased (the first points are not
    pulled towards zero). Vectorised per block: a^-j stays finite within a block."""
    if weight <= 0 or len(values) == 0:
        return values
    out = np.empty(len(values))
    a = weight
    powers = a ** np.arange(block + 1)
    inv = 1.0 / powers[:block]
    state = 0.0
    for start in range(0, len(values), block):
        x = values[start : start + block]
        k = len(x)
        acc = np.cumsum(x * inv[:k]) * powers[:k] * (1 - a)  # sum_j a^(i-j) (1-a) x_j
        out[start : start + k] = state * powers[1 : k + 1] + acc
        state = out[start + k - 1]
    debias = 1 - a ** np.arange(1, len(values) + 1)
    return out / debias


def value_at(steps: np.ndarray, values: np.ndarray, step: float) -> tuple[int, float] | None:
    """The point nearest to `step` (index, value), or None for an empty series."""
    if not len(steps):
        return None
    i = int(np.searchsorted(steps, step))
    if i == len(steps) or (i > 0 and step - steps[i - 1] <= steps[i] - step):
        i -= 1
    return i, float(values[i])


def format_number(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def column_spans(steps: np.ndarray, values: np.ndarray, x0: float, x1: float, width: int):
    """Min/max of `values` per pixel column (0..width-1) over [x0, x1], joined to the previous column.

    Returns (columns, lo, hi) arrays; empty when nothing is visible.
    """
    ok = np.isfinite(values) & (steps >= x0) & (steps <= x1)
    if not ok.all():
        steps, values = steps[ok], values[ok]
    if len(steps) == 0 or width <= 0:
        empty = np.empty(0)
        return empty.astype(np.int64), empty, empty
    span = x1 - x0 if x1 > x0 else 1.0
    px = np.minimum(((steps - x0) / span * (width - 1) + 0.5).astype(np.int64), width - 1)
    starts = np.flatnonzero(np.diff(px, prepend=-1))
    cols = px[starts]
    lo = np.minimum.reduceat(values, starts)
    hi = np.maximum.reduceat(values, starts)
    first = values[starts]
    last = values[np.append(starts[1:], len(values)) - 1]
    if len(cols) > 1 and cols[-1] - cols[0] + 1 > len(cols):
        # Sparse points (KID every N steps): fill the columns between them by linear interpolation.
        full = np.arange(cols[0], cols[-1] + 1)
        interp = np.interp(full, cols, first)
        present = np.zeros(len(full), dtype=bool)
        present[cols - cols[0]] = True
        lo_f, hi_f, last_f = interp.copy(), interp.copy(), interp.copy()
        lo_f[present], hi_f[present], last_f[present] = lo, hi, last
        cols, lo, hi, last = full, lo_f, hi_f, last_f
    prev = np.concatenate(([last[0]], last[:-1]))
    return cols, np.minimum(lo, prev), np.maximum(hi, prev)


class Chart(Widget):
    """Traces over a shared step axis, with an optional vertical marker (the turning point) and
    cursor. A click sets the cursor at its step (`CursorSet`)."""

    DEFAULT_CSS = """
    Chart { height: 1fr; min-height: 4; }
    """

    class CursorSet(Message):
        def __init__(self, step: float) -> None:
            super().__init__()
            self.step = step

    def __init__(
        self, title: str = "", *, name: str | None = None, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.title = title
        self.traces: list[Trace] = []
        self.marker: tuple[float, str] | None = None
        self.x_range: tuple[float, float] | None = None
        self.cursor: float | None = None
        self.log_y = False
        self.empty_text = "no data yet"
        self._key: object = None
        self._cache_key: object = None
        self._lines: list[Strip] = []
        self._drawn_x: tuple[float, float] | None = None  # the step range of the last frame
        self._base = Style()  # the widget's own style, read once per frame by render_lines

    def set_data(
        self,
        traces: list[Trace],
        key: object,
        *,
        marker: tuple[float, str] | None = None,
        x_range: tuple[float, float] | None = None,
        title: str | None = None,
        cursor: float | None = None,
        log_y: bool = False,
    ) -> None:
        """New data; `key` identifies it (e.g. (job, version, view)) so unchanged data draws nothing."""
        if key == self._key and title in (None, self.title):
            return
        self.traces, self.marker, self.x_range, self._key = traces, marker, x_range, key
        self.cursor, self.log_y = cursor, log_y
        if title is not None:
            self.title = title
        self.refresh()

    def render_lines(self, crop: Region) -> list[Strip]:
        # The base style once a frame, not once a line: `rich_style` walks the ancestors' styles
        # (it was a third of the chart's share of a frame in bench_tui's profile).
        self._base = self.rich_style
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        # The widget's own style (its background) goes under every cell: Textual does not add it
        # to lines from render_line, and cells left at the terminal's default background show as
        # white panes in a light-background terminal (seen in a stock xterm).
        base = self._base
        key = (self._key, self.size, self.title, base)
        if key != self._cache_key:
            self._lines = [line.apply_style(base) for line in self._draw(self.size.width, self.size.height)]
            self._cache_key = key
        return self._lines[y] if y < len(self._lines) else Strip.blank(self.size.width, base)

    def on_click(self, event: Click) -> None:
        cols = self.size.width - GUTTER
        if self._drawn_x is None or cols < 2 or event.x < GUTTER:
            return
        x0, x1 = self._drawn_x
        self.post_message(self.CursorSet(x0 + (event.x - GUTTER) / (cols - 1) * (x1 - x0)))

    # -- drawing --------------------------------------------------------------------------------

    def _legend(self, width: int, notes: list[str]) -> Strip:
        segs = [Segment(self.title, Style(bold=True))]
        if self.log_y:
            segs.append(Segment(" (log)", Style(dim=True)))
        if self.cursor is not None:
            segs.append(Segment(f"  @ step {self.cursor:.0f}", Style(color="bright_white", bold=True)))
        for t in self.traces:
            if t.dim:
                continue
            read = value_at(t.steps, t.values, self.cursor) if self.cursor is not None else None
            if self.cursor is None and len(t.values):
                read = (len(t.values) - 1, float(t.values[-1]))
            text = "-"
            if read is not None:
                i, v = read
                text = format_number(v)
                if t.err is not None and np.isfinite(t.err[i]):
                    text += f"±{format_number(float(t.err[i]))}"
                if self.cursor is not None and t.steps[i] != round(self.cursor):
                    text += f" (step {t.steps[i]:.0f})"
            segs += [Segment("  "), Segment("━ ", Style(color=t.color)), Segment(f"{t.label} {text}")]
        if self.marker is not None:
            segs += [Segment("  "), Segment(f"┊ {self.marker[1]}", Style(color="yellow"))]
        for note in notes:
            segs += [Segment("  "), Segment(note, Style(color="yellow", italic=True))]
        return Strip(segs).crop_extend(0, width, None)

    def _y(self, values: np.ndarray) -> np.ndarray:
        """Values on the y-axis' scale: log10 on a log scale (values <= 0 have no place: NaN)."""
        if not self.log_y:
            return values
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)

    def _label(self, y: float) -> str:
        return format_number(10**y if self.log_y else y)

    def _draw(self, width: int, height: int) -> list[Strip]:
        if width <= 0 or height <= 0:
            return []
        rows, cols = height - 2, width - GUTTER
        traces = [t for t in self.traces if len(t.steps)]
        if rows < 1 or cols < 4 or not traces:
            self._drawn_x = None
            lines = [
                self._legend(width, []),
                Strip([Segment(self.empty_text, Style(dim=True))]).crop_extend(0, width, None),
            ]
            return lines + [Strip.blank(width)] * (height - len(lines))
        if self.x_range is not None:
            x0, x1 = self.x_range
        else:
            x0 = min(float(t.steps[0]) for t in traces)
            x1 = max(float(t.steps[-1]) for t in traces)
        if x1 <= x0:  # one step (a single evaluation): centre it instead of pinning it to an edge
            x0, x1 = x0 - 1, x1 + 1
        self._drawn_x = (x0, x1)
        pw, ph = cols * 2, rows * 4
        notes = self._notes(traces, x0, x1)
        spans = [column_spans(t.steps, self._y(t.values), x0, x1, pw) for t in traces]
        bars = [self._bars(t, x0, x1, pw) for t in traces]
        lows = [s[1].min() for s in [*spans, *bars] if len(s[0])]
        highs = [s[2].max() for s in [*spans, *bars] if len(s[0])]
        y0, y1 = (min(lows), max(highs)) if lows else (0.0, 1.0)
        if y1 <= y0:
            pad = 0.5 if self.log_y else 0.5 * (abs(y0) or 1)
            y0, y1 = y0 - pad, y1 + pad
        owner = np.full((rows, cols), -1, dtype=np.int32)
        bits = np.zeros((rows, cols), dtype=np.int32)
        faint = np.zeros((rows, cols), dtype=bool)  # error bars only: drawn dim in the trace's colour
        prow = np.arange(ph)[:, None]

        def dots(pcols: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
            top = (ph - 1) - np.round((np.minimum(hi, y1) - y0) / (y1 - y0) * (ph - 1)).astype(np.int64)
            bot = (ph - 1) - np.round((np.maximum(lo, y0) - y0) / (y1 - y0) * (ph - 1)).astype(np.int64)
            grid = np.zeros((ph, pw), dtype=bool)
            grid[:, pcols] = (prow >= top[None, :]) & (prow <= bot[None, :])
            return np.einsum("rycx,yx->rc", grid.reshape(rows, 4, cols, 2).astype(np.int32), _DOT_BITS)

        for i, (pcols, lo, hi) in enumerate(bars):
            if len(pcols):
                tb = dots(pcols, lo, hi)
                free = (tb > 0) & (owner < 0)
                bits[free] |= tb[free]
                owner[free], faint[free] = i, True
        points: list[tuple[int, int, int, float]] = []  # (row, col, trace, value): sparse traces' markers
        for i, (pcols, lo, hi) in enumerate(spans):
            if not len(pcols):
                continue
            tb = dots(pcols, lo, hi)
            bits = np.where(faint & (tb > 0), tb, bits | tb)  # a line covers the bars under it
            faint &= tb == 0
            owner[tb > 0] = i
            points += self._markers(traces[i], i, x0, x1, y0, y1, rows, cols)
        chars = _BRAILLE[bits]
        styles = [Style(color=t.color, dim=True) if t.dim else Style(color=t.color) for t in traces]
        faint_styles = [Style(color=t.color, dim=True) for t in traces]
        special: dict[tuple[int, int], tuple[str, Style]] = {}
        per_trace = Counter(i for _, _, i, _ in points)
        alone = {i for i, n in per_trace.items() if n == 1}
        for r, c, i, v in points:
            style = Style(color=traces[i].color, bold=True)
            special[(r, c)] = ("●", style)
            if i in alone:  # one evaluation: its value beside it, not a lone dot at the edge
                label = f" {format_number(v)} "
                start = c + 1 if c + 1 + len(label) <= cols else c - len(label)
                for k, ch in enumerate(label):
                    if 0 <= start + k < cols:
                        special.setdefault((r, start + k), (ch, style))
        columns = (
            {self._column(self.marker[0], x0, x1, pw): ("┊", Style(color="yellow"))} if self.marker else {}
        )
        if self.cursor is not None:
            columns[self._column(self.cursor, x0, x1, pw)] = ("│", Style(color="bright_white"))
        columns.pop(-1, None)
        axis = Style(dim=True)
        labels = {0: self._label(y1), rows - 1: self._label(y0)}
        if rows >= 5:
            labels[rows // 2] = self._label((y0 + y1) / 2)
        zero_row = -1
        if not self.log_y and y0 < 0 < y1:  # negative KIDs: the zero line says where "no difference" is
            zero_row = int(round((y1 - 0.0) / (y1 - y0) * (rows - 1)))
        lines = [self._legend(width, notes)]
        # Python lists: indexing numpy arrays cell by cell cost 25 ms a chart (bench_tui).
        owner_rows, char_rows, faint_rows = owner.tolist(), chars.tolist(), faint.tolist()
        for r in range(rows):
            segs = [Segment(labels.get(r, "").rjust(GUTTER - 1)[: GUTTER - 1] + "┤", axis)]
            run_style: Style | None = None
            run: list[str] = []
            owner_row, char_row, faint_row = owner_rows[r], char_rows[r], faint_rows[r]
            for c in range(cols):
                o = owner_row[c]
                ch = char_row[c]
                st = None if o < 0 else (faint_styles[o] if faint_row[c] else styles[o])
                if special and (r, c) in special:
                    ch, st = special[(r, c)]
                elif c in columns:
                    glyph, col_style = columns[c]
                    st = col_style
                    if o < 0:
                        ch = glyph
                elif o < 0 and r == zero_row:
                    ch, st = "╌", axis
                if st is not run_style and run:
                    segs.append(Segment("".join(run), run_style))
                    run = []
                run_style = st
                run.append(ch)
            if run:
                segs.append(Segment("".join(run), run_style))
            lines.append(Strip(segs, width))
        left, right = f"{x0:.0f}", f"{x1:.0f}"
        axis_line = " " * GUTTER + left + right.rjust(cols - len(left))
        lines.append(Strip([Segment(axis_line, axis)]).crop_extend(0, width, None))
        return lines[:height]

    @staticmethod
    def _column(step: float, x0: float, x1: float, pw: int) -> int:
        if not x0 <= step <= x1:
            return -1
        return int((step - x0) / (x1 - x0) * (pw - 1) + 0.5) // 2

    def _bars(self, t: Trace, x0: float, x1: float, pw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Error bars of `t` (value ± err) per pixel column, on the y-axis' scale, not joined."""
        empty = np.empty(0)
        if t.err is None or t.dim:
            return empty.astype(np.int64), empty, empty
        ok = np.isfinite(t.values) & np.isfinite(t.err) & (t.steps >= x0) & (t.steps <= x1)
        steps, lo, hi = t.steps[ok], (t.values - t.err)[ok], (t.values + t.err)[ok]
        if self.log_y:  # a bar reaching below zero goes to the bottom of a log axis
            lo = np.where(lo > 0, lo, np.nan)
        lo, hi = self._y(lo), self._y(hi)
        keep = np.isfinite(hi)
        steps, lo, hi = steps[keep], lo[keep], hi[keep]
        if not len(steps):
            return empty.astype(np.int64), empty, empty
        lo = np.where(np.isfinite(lo), lo, -np.inf)
        px = np.minimum(((steps - x0) / (x1 - x0) * (pw - 1) + 0.5).astype(np.int64), pw - 1)
        return px, lo, hi

    def _markers(
        self, t: Trace, i: int, x0: float, x1: float, y0: float, y1: float, rows: int, cols: int
    ) -> list[tuple[int, int, int, float]]:
        """A ● on each point of a sparse, current trace (an evaluation every N steps)."""
        lo, hi = np.searchsorted(t.steps, [x0, x1 + 1e-9])
        if t.dim or hi - lo > SPARSE:  # a dense series (every step): no markers, and no log10 of it
            return []
        ys = self._y(t.values)
        ok = np.isfinite(ys) & (t.steps >= x0) & (t.steps <= x1)
        if not 0 < ok.sum() <= SPARSE:
            return []
        # The cell of the dot the line draws for the point (same pixel mapping as `dots`).
        pw, ph = cols * 2, rows * 4
        c = np.minimum(((t.steps[ok] - x0) / (x1 - x0) * (pw - 1) + 0.5).astype(np.int64), pw - 1) // 2
        r = ((ph - 1) - np.round((np.clip(ys[ok], y0, y1) - y0) / (y1 - y0) * (ph - 1)).astype(np.int64)) // 4
        return [(int(rr), int(cc), i, float(v)) for rr, cc, v in zip(r, c, t.values[ok], strict=True)]

    def _notes(self, traces: list[Trace], x0: float, x1: float) -> list[str]:
        """What the picture alone would hide: values a log axis cannot show, negative KIDs."""
        notes = []
        current = [t for t in traces if not t.dim]
        visible = [t.values[(t.steps >= x0) & (t.steps <= x1)] for t in current]
        negative = sum(int((v < 0).sum()) for v in visible)
        if negative and self.log_y:
            notes.append(f"{negative} values ≤ 0 hidden (log)")
        elif negative and self.title.startswith("KID"):
            # KID is an unbiased estimate: below zero means "no measurable difference", not an error.
            notes.append(f"{negative} KID < 0 (unbiased estimate: read as 0)")
        return notes

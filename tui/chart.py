"""A line chart drawn with braille dots (2x4 per cell), one widget, no plotting dependency.

Downsampling is for display only: every point is binned to its pixel column and each column draws the
span from its minimum to its maximum (joined to the previous column), so spikes survive at any zoom
and 10,000 points cost a few numpy calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

# Bit of each dot in a braille cell, indexed [dy][dx].
_DOT_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.int32)
_BRAILLE = np.array([chr(0x2800 + i) for i in range(256)])
GUTTER = 8  # y labels


@dataclass(frozen=True)
class Trace:
    label: str
    steps: np.ndarray
    values: np.ndarray
    color: str
    dim: bool = False  # superseded by a rollback: drawn faint, under the others, not in the legend


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
    """Traces over a shared step axis, with an optional vertical marker (the turning point)."""

    DEFAULT_CSS = """
    Chart { height: 1fr; min-height: 4; }
    """

    def __init__(
        self, title: str = "", *, name: str | None = None, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.title = title
        self.traces: list[Trace] = []
        self.marker: tuple[float, str] | None = None
        self.x_range: tuple[float, float] | None = None
        self.empty_text = "no data yet"
        self._key: object = None
        self._cache_key: object = None
        self._lines: list[Strip] = []

    def set_data(
        self,
        traces: list[Trace],
        key: object,
        *,
        marker: tuple[float, str] | None = None,
        x_range: tuple[float, float] | None = None,
        title: str | None = None,
    ) -> None:
        """New data; `key` identifies it (e.g. (job, version)) so unchanged data draws nothing."""
        if key == self._key and title in (None, self.title):
            return
        self.traces, self.marker, self.x_range, self._key = traces, marker, x_range, key
        if title is not None:
            self.title = title
        self.refresh()

    def render_line(self, y: int) -> Strip:
        # The widget's own style (its background) goes under every cell: Textual does not add it
        # to lines from render_line, and cells left at the terminal's default background show as
        # white panes in a light-background terminal (seen in a stock xterm).
        base = self.rich_style
        key = (self._key, self.size, self.title, base)
        if key != self._cache_key:
            self._lines = [line.apply_style(base) for line in self._draw(self.size.width, self.size.height)]
            self._cache_key = key
        return self._lines[y] if y < len(self._lines) else Strip.blank(self.size.width, base)

    # -- drawing --------------------------------------------------------------------------------

    def _legend(self, width: int) -> Strip:
        segs = [Segment(self.title, Style(bold=True))]
        for t in self.traces:
            if t.dim:
                continue
            last = t.values[-1] if len(t.values) else float("nan")
            segs += [
                Segment("  "),
                Segment("━ ", Style(color=t.color)),
                Segment(f"{t.label} {format_number(last)}"),
            ]
        if self.marker is not None:
            segs += [Segment("  "), Segment(f"┊ {self.marker[1]}", Style(color="yellow"))]
        return Strip(segs).crop_extend(0, width, None)

    def _draw(self, width: int, height: int) -> list[Strip]:
        if width <= 0 or height <= 0:
            return []
        lines = [self._legend(width)]
        rows, cols = height - 2, width - GUTTER
        traces = [t for t in self.traces if len(t.steps)]
        if rows < 1 or cols < 4 or not traces:
            lines.append(Strip([Segment(self.empty_text, Style(dim=True))]).crop_extend(0, width, None))
            return lines + [Strip.blank(width)] * (height - len(lines))
        if self.x_range is not None:
            x0, x1 = self.x_range
        else:
            x0 = min(float(t.steps[0]) for t in traces)
            x1 = max(float(t.steps[-1]) for t in traces)
        pw, ph = cols * 2, rows * 4
        spans = [column_spans(t.steps, t.values, x0, x1, pw) for t in traces]
        lows = [s[1].min() for s in spans if len(s[0])]
        highs = [s[2].max() for s in spans if len(s[0])]
        y0, y1 = (min(lows), max(highs)) if lows else (0.0, 1.0)
        if y1 <= y0:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
        owner = np.full((rows, cols), -1, dtype=np.int32)
        bits = np.zeros((rows, cols), dtype=np.int32)
        prow = np.arange(ph)[:, None]
        for i, (pcols, lo, hi) in enumerate(spans):
            if not len(pcols):
                continue
            top = (ph - 1) - np.round((hi - y0) / (y1 - y0) * (ph - 1)).astype(np.int64)
            bot = (ph - 1) - np.round((lo - y0) / (y1 - y0) * (ph - 1)).astype(np.int64)
            grid = np.zeros((ph, pw), dtype=bool)
            grid[:, pcols] = (prow >= top[None, :]) & (prow <= bot[None, :])
            g = grid.reshape(rows, 4, cols, 2)
            tb = np.einsum("rycx,yx->rc", g.astype(np.int32), _DOT_BITS)
            bits |= tb
            owner[tb > 0] = i
        marker_col = -1
        if self.marker is not None and x1 > x0 and x0 <= self.marker[0] <= x1:
            marker_col = int((self.marker[0] - x0) / (x1 - x0) * (pw - 1) + 0.5) // 2
        chars = _BRAILLE[bits]
        styles = [Style(color=t.color, dim=True) if t.dim else Style(color=t.color) for t in traces]
        marker_style = Style(color="yellow")
        labels = {0: format_number(y1), rows - 1: format_number(y0)}
        if rows >= 5:
            labels[rows // 2] = format_number((y0 + y1) / 2)
        axis = Style(dim=True)
        for r in range(rows):
            segs = [Segment(labels.get(r, "").rjust(GUTTER - 1)[: GUTTER - 1] + "┤", axis)]
            run_style: Style | None = None
            run: list[str] = []
            for c in range(cols):
                o = owner[r, c]
                ch = chars[r, c]
                if c == marker_col:
                    st = marker_style
                    if o < 0:
                        ch = "┊"
                else:
                    st = styles[o] if o >= 0 else None
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

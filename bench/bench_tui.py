"""dallm-tui benchmark: 10 jobs x 10,000 points per series, headless (Textual's test driver).

    .venv/bin/python bench/bench_tui.py [--jobs 10] [--points 10000] [--updates 40] [--idle 10]
                                        [--slowest 5] [--profile FILE] [--chart braille|plotext]

Prints:
- load: time to load every job's history into the TUI (through the feed thread, as from a daemon);
- redraw: for one live metrics event on the selected job, the time from the daemon publishing it
  to the end of the frame that shows it (feed thread -> message -> model -> widgets -> compositor),
  median, p90 and worst over `--updates` events; and the cost of redrawing both charts from scratch
  alone;
- the time split of those frames (`FrameSplit`): the median per step, the lines each widget
  re-rendered, and for each of the `--slowest` frames what it spent its time on; the garbage
  collections during the updates (`--profile FILE`: cProfile of the UI thread meanwhile);
- idle: CPU used by the whole process (all threads) while connected and nothing happens, as a share
  of one core;
- a last `RESULT: PASS` or `RESULT: FAIL (...)` line against the targets: median, p90 and worst
  event -> frame <= 50 ms, idle < 5 % of a core. Run it on a quiet machine: the load average is
  printed at the start and with the result.

`--chart plotext` swaps the own braille chart for textual-plotext's `PlotextPlot` (a maintained
Textual plotting widget; `pip install textual-plotext`, not a dependency of dallm) drawing the same
traces, to decide whether the own chart earns its keep.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dallm.protocol import JobSummary, MetricsEvent  # noqa: E402
from dallm.testing.fake_daemon import FakeConnection  # noqa: E402
from dallm.tui.app import DallmApp  # noqa: E402
from dallm.tui.chart import Chart, Trace  # noqa: E402
from dallm.tui.demo import job_events, metrics_at  # noqa: E402
from dallm.tui.widgets import ConnectionBar, JobTable  # noqa: E402


class FrameSplit:
    """Where the time between publishing an event and its frame went, per frame.

    Wraps the UI thread's steps (model, queue table, charts, other widgets, layout, compositor,
    terminal write) with timers that count *exclusive* time (a nested step's time is its own, not
    its caller's), and counts garbage collections through `gc.callbacks` (a collection on the UI
    thread interrupts whatever step runs: it is taken out of that step). What is left of the
    window ("wait") is the feed thread, the message queue and Textual's frame timer (a frame is
    drawn at most every 1/60 s after the first change)."""

    def __init__(self) -> None:
        self.main = threading.get_ident()
        self.stack: list[list[float]] = []  # [start, time of nested steps]
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rendered: dict[str, int] = defaultdict(int)  # widgets rendered, by class
        self.collections: list[tuple[int, float]] = []  # (generation, ms) on the UI thread, all run
        self.gc_other = 0.0  # collections on the feed thread (they hold the GIL: the UI waits too)
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)

    def close(self) -> None:
        gc.callbacks.remove(self._gc)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()
        self.rendered.clear()
        self.gc_other = 0.0

    def _enter(self) -> None:
        self.stack.append([time.perf_counter(), 0.0])

    def _exit(self, category: str) -> None:
        start, nested = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[category] += elapsed - nested
        self.calls[category] += 1
        if self.stack:
            self.stack[-1][1] += elapsed

    def _gc(self, phase: str, info: dict) -> None:
        if threading.get_ident() != self.main:
            if phase == "start":
                self._gc_start = time.perf_counter()
            else:
                self.gc_other += time.perf_counter() - self._gc_start
            return
        if phase == "start":
            self._enter()
        else:
            elapsed = time.perf_counter() - self.stack[-1][0]
            self.collections.append((info["generation"], elapsed * 1000))
            self._exit(f"gc gen{info['generation']}")

    def wrap(self, owner: object, name: str, category: str) -> None:
        original: Callable = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            if threading.get_ident() != self.main:
                return original(*args, **kwargs)
            self._enter()
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(category)

        setattr(owner, name, timed)

    def instrument(self) -> None:
        from textual._compositor import Compositor
        from textual.screen import Screen
        from textual.widgets import DataTable

        from dallm.tui import app, chart_panel, thumbnail, widgets
        from dallm.tui.model import Model

        self.wrap(Model, "apply_live", "model")
        self.wrap(app.DallmApp, "show_queue", "queue: rows")
        self.wrap(DataTable, "render_line", "queue: draw")
        self.wrap(chart_panel.Charts, "redraw", "charts: traces")
        self.wrap(Chart, "_draw", "charts: draw")
        for cls, name in (
            (widgets.JobHeader, "redraw"),
            (widgets.CheckpointList, "redraw"),
            (widgets.ActivityLog, "redraw"),
            (thumbnail.Thumbnail, "_redraw"),
        ):
            self.wrap(cls, name, "other widgets")
        self.count_renders()
        self.wrap(Screen, "_refresh_layout", "layout")
        self.wrap(Compositor, "render_update", "compositor")
        self.wrap(app.DallmApp, "_display", "terminal write")

    def count_renders(self) -> None:
        """Count the lines the compositor re-renders per widget class (cache misses)."""
        from textual._styles_cache import StylesCache
        from textual.geometry import Region
        from textual.widget import Widget

        original = StylesCache.render_widget

        def counted(cache: StylesCache, widget: Widget, crop: Region) -> list:
            # Lines re-rendered: the dirty ones in the crop (the compositor asks every widget
            # under the changed region for its lines; clean lines come from the widget's cache).
            dirty, cached = cache._dirty_lines, cache._cache
            n = sum(1 for y in range(crop.y, crop.bottom) if y in dirty or y not in cached)
            if n:
                self.rendered[type(widget).__name__] += n
            return original(cache, widget, crop)

        StylesCache.render_widget = counted  # type: ignore[method-assign]

    def split(self, window_ms: float) -> dict[str, float]:
        """The current window's split in ms, with what no step accounts for as "wait"."""
        out = {k: v * 1000 for k, v in self.totals.items()}
        if self.gc_other:
            out["gc (feed thread)"] = self.gc_other * 1000
        out["wait"] = max(window_ms - sum(out.values()), 0.0)
        return out


def split_text(split: dict[str, float], top: int = 5) -> str:
    parts = sorted(split.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05)


@dataclass
class Frame:
    """One live update: publish -> frame time, its split (ms), step calls and widgets rendered."""

    ms: float
    split: dict[str, float]
    calls: dict[str, int]
    rendered: dict[str, int]


def report_splits(frames: list[Frame], slowest: int) -> None:
    """Per-frame split: the median over all frames, then each of the `slowest` frames."""
    keys = sorted({k for f in frames for k in f.split})
    medians = {k: statistics.median(f.split.get(k, 0.0) for f in frames) for k in keys}
    print(f"time split, median per frame (ms): {split_text(medians, top=len(keys))}")
    names = sorted({k for f in frames for k in f.rendered})
    widgets = {k: statistics.median(f.rendered.get(k, 0) for f in frames) for k in names}
    print(
        "lines re-rendered per update, median, by widget: "
        + ", ".join(f"{k} {v:g}" for k, v in widgets.items() if v)
    )
    print(f"the {slowest} slowest updates (ms; then charts drawn, table lines drawn, frames written):")
    for f in sorted(frames, key=lambda x: -x.ms)[:slowest]:
        counts = (
            f"[{f.calls.get('charts: draw', 0)} chart, {f.calls.get('queue: draw', 0)} table lines, "
            f"{f.calls.get('terminal write', 0)} frames]"
        )
        print(f"  {f.ms:6.1f}: {split_text(f.split)} {counts}")


def use_plotext() -> None:
    """Make the dashboard draw its two charts with textual-plotext (same traces, same data)."""
    from textual_plotext import PlotextPlot

    from dallm.tui import widgets

    class PlotextChart(PlotextPlot):
        """`Chart`'s interface over a PlotextPlot: every trace plotted as a line, markers as vlines."""

        def __init__(self, title: str = "", **kwargs) -> None:
            super().__init__(**kwargs)
            self.title, self.traces, self.empty_text = title, [], ""
            self._key: object = None

        def set_data(self, traces, key, *, marker=None, x_range=None, title=None, cursor=None, log_y=False):
            if key == self._key and title in (None, self.title):
                return
            self._key, self.traces = key, traces
            self.title = title or self.title
            plt = self.plt
            plt.clear_data()
            plt.title(self.title)
            plt.yscale("log" if log_y else "linear")
            for t in traces:
                plt.plot(
                    t.steps.tolist(), t.values.tolist(), label=None if t.dim else t.label, marker="braille"
                )
            if marker is not None:
                plt.vline(marker[0], "yellow")
            if x_range is not None:
                plt.xlim(*x_range)
            self.refresh()

    widgets.Chart = PlotextChart  # type: ignore[misc,assignment]
    globals()["Chart"] = PlotextChart


def draw_ab(points: int, rounds: int, size: tuple[int, int] = (110, 20)) -> None:
    """One chart of 3 series x `points`, drawn from scratch by the braille chart and by plotext in
    turns (same process, interleaved: a loaded box slows both alike). Prints the medians."""
    import numpy as np
    import plotext

    steps = np.arange(float(points))
    series = [np.sin(steps / 300 + i) + 2 + 0.05 * np.cos(steps * 1.3) for i in range(3)]
    chart = Chart("bench")
    times: dict[str, list[float]] = {"braille": [], "plotext": []}
    for r in range(rounds):
        chart.set_data([Trace(str(i), steps, v, "red") for i, v in enumerate(series)], r)
        t = time.perf_counter()
        chart._draw(*size)
        times["braille"].append(time.perf_counter() - t)
        t = time.perf_counter()
        plotext.clear_figure()
        plotext.plotsize(*size)
        for i, v in enumerate(series):
            plotext.plot(steps.tolist(), v.tolist(), label=str(i), marker="braille")
        plotext.build()
        times["plotext"].append(time.perf_counter() - t)
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(
        f"one chart, 3 x {points:,} points, {size[0]}x{size[1]} cells, from scratch, median of {rounds} "
        f"interleaved: braille {medians['braille']:.1f} ms, plotext {medians['plotext']:.1f} ms"
    )


def build(jobs: int, points: int) -> FakeConnection:
    conn = FakeConnection(endpoint="bench://fake")
    for j in range(1, jobs + 1):
        job = j
        conn.add_job(JobSummary(id=job, name=f"bench-{j}", state="queued", total_steps=points * 2))
        events = job_events(
            points, points * 2, phase=j * 0.1, eval_every=50, ckpt_every=500, tp=points // 3, samples=True
        )
        conn.emit(job, *events, live=False)
        conn.set_state(job, "running", live=False)
    return conn


TARGET_MS = 50.0  # event -> frame: median, p90 and worst of the updates
TARGET_IDLE = 5.0  # % of one core


def verdict(lat: list[float], idle: float) -> str:
    """One line against the targets, naming every figure that misses."""
    lat = sorted(lat)
    figures = {"median": statistics.median(lat), "p90": lat[int(0.9 * (len(lat) - 1))], "worst": lat[-1]}
    misses = [f"{k} {v:.1f} ms > {TARGET_MS:g}" for k, v in figures.items() if v > TARGET_MS]
    if idle >= TARGET_IDLE:
        misses.append(f"idle {idle:.2f} % >= {TARGET_IDLE:g}")
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    shown = ", ".join(f"{k} {v:.1f} ms" for k, v in figures.items())
    if misses:
        return f"RESULT: FAIL ({'; '.join(misses)}); load average now {load}"
    return (
        f"RESULT: PASS (event -> frame {shown}, all <= {TARGET_MS:g} ms; idle {idle:.2f} % < "
        f"{TARGET_IDLE:g} %); load average now {load}"
    )


async def run(args: argparse.Namespace) -> tuple[list[float], float]:
    t = time.perf_counter()
    conn = build(args.jobs, args.points)
    print(
        f"fake daemon: {args.jobs} jobs x {args.points} points per series built in {time.perf_counter() - t:.1f} s"
    )
    split = FrameSplit()
    split.instrument()
    app = DallmApp(conn, images_mode="halfblock", poll_timeout=0.25)
    frames: list[tuple[float, int]] = []  # (when, version of job 1's data shown)
    display = app._display
    # The split of the window [publish, first frame showing it], taken when that frame is written.
    window: dict[str, object] = {"t0": 0.0, "before": None, "split": None, "calls": None, "rendered": None}

    def timed_display(*a, **kw):
        out = display(*a, **kw)
        d = app.model.data.get(1)
        now = time.perf_counter()
        version = d.version if d is not None else -1
        frames.append((now, version))
        before = window["before"]
        if before is not None and window["split"] is None and version > before:  # type: ignore[operator]
            window["split"] = split.split((now - window["t0"]) * 1000)  # type: ignore[operator]
            window["calls"] = dict(split.calls)
            window["rendered"] = dict(split.rendered)
        return out

    app._display = timed_display  # type: ignore[method-assign]
    async with app.run_test(size=(args.width, args.height)) as pilot:

        async def until(pred, timeout: float = 120.0) -> None:
            end = time.perf_counter() + timeout
            while not pred():
                if time.perf_counter() > end:
                    raise SystemExit(f"timed out waiting ({len(frames)} frames since the update)")
                await asyncio.sleep(0.001)

        t = time.perf_counter()
        await until(lambda: app.query_one(ConnectionBar).connected and app.listed)
        table = app.query_one(JobTable)
        for j in range(args.jobs):
            table.move_cursor(row=j)
            job = j + 1
            await until(lambda job=job: job in app.model.data and app.model.data[job].loaded)
        load_s = time.perf_counter() - t
        table.move_cursor(row=0)
        await until(lambda: app.selected == 1)
        await pilot.pause(0.3)
        total_points = sum(len(s) for d in app.model.data.values() for s in d.series.values())
        print(
            f"load: every history through the feed in {load_s:.1f} s "
            f"({total_points:,} points in {sum(len(d.series) for d in app.model.data.values())} series)"
        )

        print(
            f"gc: {gc.get_freeze_count():,} objects frozen, "
            f"{sum(len(gc.get_objects(g)) for g in range(3)):,} tracked in generations 0-2"
        )
        # Live updates on the selected job: publish, then wait for the frame that shows it.
        latencies: list[float] = []
        handled: list[float] = []
        splits: list[Frame] = []
        data = app.model.data[1]
        step = args.points
        split.collections.clear()  # from here: the collections during the live updates
        profiler = None
        if args.profile:  # the UI thread only (cProfile follows the thread that enables it)
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        for _ in range(args.updates):
            step += 1
            before = data.version
            frames.clear()
            split.reset()
            t0 = time.perf_counter()
            window.update(t0=t0, before=before, split=None, calls=None, rendered=None)
            values = metrics_at(step, args.points * 2)
            conn.emit(1, MetricsEvent(step=step, values=values))
            await until(lambda before=before: data.version > before)
            handled.append((time.perf_counter() - t0) * 1000)
            await until(lambda before=before: any(v > before for _, v in frames))
            shown = next(t for t, v in frames if v > before)
            latencies.append((shown - t0) * 1000)
            splits.append(
                Frame(latencies[-1], window["split"] or {}, window["calls"] or {}, window["rendered"] or {})  # type: ignore[arg-type]
            )
            window["before"] = None
            await asyncio.sleep(0.02)
        split.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            print(f"profile of the UI thread during the updates: {args.profile} (python -m pstats)")
        lat = sorted(latencies)
        print(
            f"redraw after a live update: median {statistics.median(lat):.1f} ms, "
            f"p90 {lat[int(0.9 * (len(lat) - 1))]:.1f} ms, worst {lat[-1]:.1f} ms "
            f"over {len(lat)} updates (target < 50 ms); "
            f"of which publish -> model updated: median {statistics.median(handled):.1f} ms"
        )
        report_splits(splits, args.slowest)
        for gen in range(3):
            times = [ms for g, ms in split.collections if g == gen]
            if times:
                print(
                    f"  gc gen{gen} on the UI thread during the updates: {len(times)} collections, "
                    f"median {statistics.median(times):.1f} ms, worst {max(times):.1f} ms"
                )

        charts = list(app.query(Chart))
        t = time.perf_counter()
        n = 20
        for _ in range(n):
            for c in charts:
                if hasattr(c, "_draw"):
                    c._draw(c.size.width, c.size.height)
                else:  # plotext: build the whole text of the plot
                    c.render()
        per = (time.perf_counter() - t) / n * 1000
        print(f"both charts drawn from scratch ({data.series['loss'].n:,} points each series): {per:.1f} ms")

        # Idle: connected, nothing happening.
        await pilot.pause(0.5)
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(args.idle)
        cpu = (time.process_time() - c0) / (time.perf_counter() - w0) * 100
        print(f"idle CPU: {cpu:.2f} % of one core over {args.idle:g} s (target < 5 %)")
        return latencies, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--points", type=int, default=10_000)
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--slowest", type=int, default=5, help="frames whose time split is printed")
    p.add_argument("--profile", metavar="FILE", help="cProfile the UI thread during the updates")
    p.add_argument("--chart", choices=("braille", "plotext"), default="braille")
    p.add_argument("--draw-ab", type=int, metavar="ROUNDS", help="only: braille vs plotext, one chart")
    args = p.parse_args()
    if args.draw_ab:
        draw_ab(args.points, args.draw_ab)
        return
    if args.chart == "plotext":
        use_plotext()
    print(f"chart: {args.chart}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    latencies, idle = asyncio.run(run(args))
    print(verdict(latencies, idle))


if __name__ == "__main__":
    main()

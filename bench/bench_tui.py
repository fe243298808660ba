"""dallm-tui benchmark: 10 jobs x 10,000 points per series, headless (Textual's test driver).

    .venv/bin/python bench/bench_tui.py [--jobs 10] [--points 10000] [--updates 40] [--idle 10]
                                        [--chart braille|plotext]

Prints:
- load: time to load every job's history into the TUI (through the link thread, as from a daemon);
- redraw: for one live metrics event on the selected job, the time from the daemon publishing it
  to the end of the frame that shows it (link thread -> message -> model -> widgets -> compositor),
  median and worst over `--updates` events (target < 50 ms); and the cost of redrawing both charts
  from scratch alone;
- idle: CPU used by the whole process (all threads) while connected and nothing happens, as a share
  of one core (target < 5 %).

`--chart plotext` swaps the own braille chart for textual-plotext's `PlotextPlot` (a maintained
Textual plotting widget; `pip install textual-plotext`, not a dependency of dallm) drawing the same
traces, to decide whether the own chart earns its keep.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dallm.protocol import JobSummary, MetricsEvent  # noqa: E402
from dallm.testing.fake_daemon import FakeConnection  # noqa: E402
from dallm.tui.app import DallmApp  # noqa: E402
from dallm.tui.chart import Chart, Trace  # noqa: E402
from dallm.tui.demo import job_events, metrics_at  # noqa: E402
from dallm.tui.widgets import ConnectionBar, JobTable  # noqa: E402


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


async def run(args: argparse.Namespace) -> None:
    t = time.perf_counter()
    conn = build(args.jobs, args.points)
    print(
        f"fake daemon: {args.jobs} jobs x {args.points} points per series built in {time.perf_counter() - t:.1f} s"
    )
    app = DallmApp(conn, images_mode="halfblock", poll_timeout=0.25)
    frames: list[tuple[float, int]] = []  # (when, version of job 1's data shown)
    display = app._display

    def timed_display(*a, **kw):
        out = display(*a, **kw)
        d = app.model.data.get(1)
        frames.append((time.perf_counter(), d.version if d is not None else -1))
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
            f"load: every history through the link in {load_s:.1f} s "
            f"({total_points:,} points in {sum(len(d.series) for d in app.model.data.values())} series)"
        )

        # Live updates on the selected job: publish, then wait for the frame that shows it.
        latencies: list[float] = []
        handled: list[float] = []
        data = app.model.data[1]
        step = args.points
        for _ in range(args.updates):
            step += 1
            before = data.version
            frames.clear()
            t0 = time.perf_counter()
            values = metrics_at(step, args.points * 2)
            conn.emit(1, MetricsEvent(step=step, values=values))
            await until(lambda before=before: data.version > before)
            handled.append((time.perf_counter() - t0) * 1000)
            await until(lambda before=before: any(v > before for _, v in frames))
            shown = next(t for t, v in frames if v > before)
            latencies.append((shown - t0) * 1000)
            await asyncio.sleep(0.02)
        lat = sorted(latencies)
        print(
            f"redraw after a live update: median {statistics.median(lat):.1f} ms, "
            f"p90 {lat[int(0.9 * (len(lat) - 1))]:.1f} ms, worst {lat[-1]:.1f} ms "
            f"over {len(lat)} updates (target < 50 ms); "
            f"of which publish -> model updated: median {statistics.median(handled):.1f} ms"
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--points", type=int, default=10_000)
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--chart", choices=("braille", "plotext"), default="braille")
    p.add_argument("--draw-ab", type=int, metavar="ROUNDS", help="only: braille vs plotext, one chart")
    args = p.parse_args()
    if args.draw_ab:
        draw_ab(args.points, args.draw_ab)
        return
    if args.chart == "plotext":
        use_plotext()
    print(f"chart: {args.chart}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

# ruff: noqa: F811 - pytest fixtures imported from test_tui
"""Pilot tests of the views beyond the queue (tui/views/) against the in-memory daemon: queue
filter/search/sort, compare, the worker log tail, job details with export, clone with overrides,
resources, the theme toggle and the command palette."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from test_tui import anyio_backend, conn, make_app, notifications, until  # noqa: F401 - fixtures
from textual.widgets import Static

from dallm.testing.fake_daemon import FakeConnection
from dallm.tui.app import DallmApp
from dallm.tui.chart import Chart
from dallm.tui.demo import demo_connection, script_gpu_machine
from dallm.tui.views.clone import CloneScreen, parse_overrides
from dallm.tui.views.compare import CompareScreen
from dallm.tui.views.details import DetailsScreen
from dallm.tui.views.logs import LogTailScreen, line_styles
from dallm.tui.views.queue import QueueView
from dallm.tui.views.resources import ResourcesScreen
from dallm.tui.widgets import ConnectionBar, JobTable

pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("tui")]


async def ready(pilot, app: DallmApp) -> None:
    await until(pilot, lambda: app.query_one(ConnectionBar).connected and app.listed)
    await pilot.pause()


def table_ids(app: DallmApp) -> list[int]:
    table = app.query_one(JobTable)
    return [int(r.key.value) for r in table.ordered_rows]


async def select(pilot, app: DallmApp, job: int) -> None:
    table = app.query_one(JobTable)
    table.focus()
    table.move_cursor(row=table.get_row_index(str(job)))
    await until(pilot, lambda: app.selected == job)


# -- queue management ---------------------------------------------------------------------------


async def test_search_filter_hide_and_sort(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert table_ids(app) == [1, 4, 3, 2]  # run order: running, queued, then ended (newest first)
        await pilot.press("slash", *"sweep")
        await until(pilot, lambda: sorted(table_ids(app)) == [2, 3])
        assert "name ~ 'sweep'" in str(app.query_one("#queue-filter").render())
        await pilot.press("enter")  # keeps the filter, back to the table
        assert isinstance(app.focused, JobTable) and sorted(table_ids(app)) == [2, 3]
        await pilot.press("slash", "escape")  # escape clears it
        await until(pilot, lambda: len(table_ids(app)) == 4)
        await pilot.press("h")  # hide finished (every ended state)
        await until(pilot, lambda: table_ids(app) == [1, 4])
        await pilot.press("h", "f")  # back; then only the running ones
        await until(pilot, lambda: table_ids(app) == [1])
        assert app.queue_view.state == "running"
        for _ in range(6):  # round the cycle back to every state (stopped, stopped-early on the way)
            await pilot.press("f")
        await until(pilot, lambda: len(table_ids(app)) == 4)
        await pilot.press("o")  # sort by name
        await until(pilot, lambda: table_ids(app) == [1, 3, 2, 4])


def test_queue_view_rows() -> None:
    conn = demo_connection(points=10)
    rows = [conn.summary(j) for j in conn.job_ids()]
    assert [r.id for r in QueueView(search="3").rows(rows)] == [3]  # an id matches exactly
    assert [r.id for r in QueueView(search="R16").rows(rows)] == [2]  # names case-insensitively
    assert QueueView().describe() == ""
    view = QueueView(state="failed", hide_finished=True, sort="name")
    assert view.describe() == "state = failed · finished hidden · sorted by name"
    assert view.rows(rows) == []  # failed is an ended state: hidden


# -- compare ------------------------------------------------------------------------------------


async def test_compare_overlays_the_marked_jobs(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await select(pilot, app, 1)
        await pilot.press("space", "v")  # one job: nothing to compare
        await until(pilot, lambda: any("mark two or more" in m for m in notifications(app)))
        assert not isinstance(app.screen, CompareScreen)
        await select(pilot, app, 2)
        await pilot.press("space")
        assert app.marked == [1, 2]
        assert str(app.query_one(JobTable).get_cell("2", "name")).startswith("● ")
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen))
        top = app.screen.query_one("#compare-top", Chart)
        bottom = app.screen.query_one("#compare-bottom", Chart)
        await until(pilot, lambda: len(top.traces) == 2 and len(bottom.traces) == 2)
        assert [t.label for t in top.traces] == ["1 quickstart-r4", "2 sweep-r16-n20"]
        assert top.traces[0].color != top.traces[1].color
        assert bottom.title == "KID (val)" and len(bottom.traces[1].steps) == 1000 // 50
        legend = top.render_line(0).text
        assert "1 quickstart-r4" in legend and "2 sweep-r16-n20" in legend
        # the loss of both, and what differs between their configs (read from the daemon)
        loss = app.screen.query_one("#compare-loss", Chart)
        await until(pilot, lambda: len(loss.traces) == 2)
        diff = app.screen.query_one("#compare-config", Static)
        await until(pilot, lambda: "config differences (1 | 2):" in str(diff.render()))
        # live: job 1 moves on, its curve grows on the open view
        before = len(top.traces[0].steps)
        from dallm.tui.demo import job_events

        conn.emit(1, *job_events(320, 1000, start=300))
        await until(pilot, lambda: len(top.traces[0].steps) > before)
        await pilot.press("escape")
        assert not isinstance(app.screen, CompareScreen)
        await select(pilot, app, 1)
        await pilot.press("space")  # unmark
        assert app.marked == [2]


# -- log tail -----------------------------------------------------------------------------------


def log_lines(screen: LogTailScreen) -> list[str]:
    return [strip.text.rstrip() for strip in screen.query_one("#log-text").lines]


async def test_log_tail_shows_the_traceback_follows_and_searches(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await select(pilot, app, 3)  # the failed job
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LogTailScreen))
        screen = app.screen
        await until(pilot, lambda: any("OutOfMemoryError" in line for line in log_lines(screen)))
        lines = log_lines(screen)
        assert "Traceback (most recent call last):" in lines
        assert "worker log of job 3 (sweep-r1-n5)" in str(screen.query_one("#log-title").render())
        # following: what the worker writes next shows up
        conn.write_worker_log(3, "a line written later\n")
        await until(pilot, lambda: "a line written later" in log_lines(screen))
        await pilot.press("f")  # pause
        assert not screen.follow
        conn.write_worker_log(3, "while paused\n")
        await pilot.pause(1.5)
        assert "while paused" not in log_lines(screen)
        await pilot.press("f")
        await until(pilot, lambda: "while paused" in log_lines(screen))
        # `/`: only the lines that match
        await pilot.press("slash", *"cuda")
        await until(pilot, lambda: len(log_lines(screen)) == 1)
        assert "CUDA out of memory" in log_lines(screen)[0]
        await pilot.press("escape")  # clears the search
        await until(pilot, lambda: len(log_lines(screen)) > 5)
        await pilot.press("escape")
        assert not isinstance(app.screen, LogTailScreen)


def test_traceback_styles() -> None:
    lines = ["ok", "Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad", "after"]
    assert line_styles(lines) == ["", "red", "red", "bold red", ""]
    assert line_styles(["UserWarning: slow", "RuntimeError x"]) == ["yellow", "bold red"]


# -- details and export -------------------------------------------------------------------------


async def test_details_show_the_config_and_history_and_export(
    conn: FakeConnection, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await select(pilot, app, 2)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, DetailsScreen))
        screen = app.screen
        await until(pilot, lambda: screen.detail is not None)
        summary = str(screen.query_one("#details-summary").render())
        assert "job 2 sweep-r16-n20: finished (completed)" in summary
        assert "queued -> finished" in summary and "state history" in summary
        assert "checkpoints: 100, 200" in summary and "data /data/sweep" in summary
        config = str(screen.query_one("#details-config").render())
        assert 'name = "sweep-r16-n20"' in config and "[train]" in config
        await pilot.press("e")
        toml_path, json_path = tmp_path / "job-2-sweep-r16-n20.toml", tmp_path / "job-2-sweep-r16-n20.json"
        await until(pilot, lambda: any("job 2 exported" in (n.title or "") for n in app._notifications))
        data = tomllib.loads(toml_path.read_text())
        assert data["name"] == "sweep-r16-n20" and data["train"]["steps"] == 1000
        assert json.loads(json_path.read_text())["summary"]["id"] == 2
        await pilot.press("escape")
        assert not isinstance(app.screen, DetailsScreen)


# -- clone --------------------------------------------------------------------------------------


async def test_clone_with_overrides(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await select(pilot, app, 2)
        await pilot.press("C")
        await until(pilot, lambda: isinstance(app.screen, CloneScreen))
        await pilot.press(*"train.steps", "enter")  # not KEY=VALUE: said in the dialog
        assert isinstance(app.screen, CloneScreen)
        assert "give KEY=VALUE" in str(app.screen.query_one("#clone-error").render())
        app.screen.query_one("#clone-overrides").value = "train.steps=abc"
        await pilot.press("enter")
        await until(pilot, lambda: any("train.steps" in m for m in notifications(app)))
        assert 5 not in app.model.jobs  # nothing was queued
        await pilot.press("C")
        await until(pilot, lambda: isinstance(app.screen, CloneScreen))
        app.screen.query_one("#clone-overrides").value = "train.steps=50 lora.rank=8"
        await pilot.press("enter")
        await until(pilot, lambda: 5 in app.model.jobs)
        assert conn.sent[-1].kind == "clone" and conn.sent[-1].overrides == ("train.steps=50", "lora.rank=8")
        clone = conn.show(5)
        assert clone.summary.total_steps == 50 and clone.config["lora"]["rank"] == 8
        assert clone.config["name"] == "sweep-r16-n20 steps=50 rank=8" and "output_dir" not in clone.config


def test_parse_overrides() -> None:
    assert parse_overrides('a.b=1 c="x y"') == ["a.b=1", "c=x y"]
    assert parse_overrides("") == []
    with pytest.raises(ValueError, match="'=1'"):
        parse_overrides("=1")


# -- resources ----------------------------------------------------------------------------------


async def test_resources_per_device_and_per_job(conn: FakeConnection) -> None:
    script_gpu_machine(conn, t=0.0)  # 37.5% of 16 cores, one H200 at 93%, job 1 on it, job 2 peaks
    app = make_app(conn)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("u")
        await until(pilot, lambda: isinstance(app.screen, ResourcesScreen))
        screen = app.screen
        table = screen.query_one("#resources-jobs")
        await until(pilot, lambda: table.row_count == 2)
        host = str(screen.query_one("#resources-host").render())
        assert "37.5% of 16 cores" in host and "48.8 GiB / 128.0 GiB" in host
        assert "GPU0" in host and "93%" in host and "NVIDIA H200" in host
        assert [str(c) for c in table.get_row("1")] == [
            "1", "quickstart-r4", "running", "cuda:0", "99", "3.1 GiB", "58.6 GiB", "-", "-",
        ]  # fmt: skip
        assert [str(c) for c in table.get_row("2")][-2:] == ["2.8 GiB", "50.8 GiB"]  # peaks reported


async def test_resources_without_a_gpu_say_so(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("u")
        await until(pilot, lambda: isinstance(app.screen, ResourcesScreen))
        await until(pilot, lambda: "no GPU" in str(app.screen.query_one("#resources-host").render()))


# -- theme and palette --------------------------------------------------------------------------


async def test_theme_toggle_and_command_palette(conn: FakeConnection) -> None:
    app = make_app(conn)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        dark = app.theme
        await pilot.press("T")
        assert app.theme == "textual-light" and app.theme != dark
        await pilot.press("T")
        assert app.current_theme.dark
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("Compare", "Logs", "Details", "Resources", "Clone", "Hide finished", "Theme"):
            assert title in titles
        await pilot.press("ctrl+p")
        await until(pilot, lambda: type(app.screen).__name__ == "CommandPalette")

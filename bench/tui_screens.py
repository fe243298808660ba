"""Screenshots of each dallm-tui view for docs/tui.md: the demo daemon, headless at 160x48 with
half-block images, saved as SVG by Textual and converted to PNG when `rsvg-convert` is installed
(apt-get install librsvg2-bin).

    .venv/bin/python bench/tui_screens.py [--out docs/screens] [--views resources compare ...]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from dallm.testing.fake_daemon import FakeConnection  # noqa: E402
from dallm.tui.app import DallmApp  # noqa: E402
from dallm.tui.demo import demo_connection, script_gpu_machine  # noqa: E402
from dallm.tui.gallery import GalleryScreen  # noqa: E402
from dallm.tui.thumbnail import SampleCell  # noqa: E402
from dallm.tui.widgets import ConnectionBar, JobTable  # noqa: E402

# (file name, keys pressed from the main view, what it shows); "job:N" moves the queue's cursor
# to job N (the queue is in run order, which the demo's timing decides).
VIEWS = [
    ("main", [], "queue, CS-Fluctuation (log) + KID with error bars, thumbnail, checkpoints, log"),
    ("chart-cursor", ["z", "comma", "e"], "zoomed in, cursor reading both charts, smoothing 0.6"),
    ("loss", ["t"], "loss + CS"),
    ("gallery", ["g"], "sample gallery: base, turning point, latest"),
    ("help", ["question_mark"], "help with every key"),
    ("resources", ["u"], "resources: host, GPU, workers (a scripted sample of a GPU machine)"),
    ("compare", ["space", "job:2", "space", "v"], "compare: jobs 1 and 2 overlaid"),
    ("logs", ["job:3", "l"], "log tail of the failed job, its traceback in red"),
    ("details", ["job:2", "d"], "details: show, state history, config as TOML"),
    ("queue-search", ["slash", *"sweep", "enter"], "queue filtered by a name search"),
]


def gpu_machine(conn: FakeConnection) -> None:
    script_gpu_machine(conn, t=time.time(), live=False)


SETUP = {"resources": gpu_machine}


async def shoot(out: Path, size: tuple[int, int], only: list[str]) -> list[Path]:
    saved = []
    for name, keys, _ in VIEWS:
        if only and name not in only:
            continue
        conn = demo_connection(points=400)
        if name in SETUP:
            SETUP[name](conn)
        app = DallmApp(conn, images_mode="halfblock", poll_timeout=0.05)
        async with app.run_test(size=size) as pilot:
            deadline = time.monotonic() + 30
            while not (
                app.query_one(ConnectionBar).connected and 1 in app.model.data and app.model.data[1].loaded
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the demo did not load")
                await pilot.pause(0.05)
            while len(app.query(SampleCell)) < 4 and time.monotonic() < deadline:
                await pilot.pause(0.05)
            for key in keys:
                if key.startswith("job:"):
                    table = app.query_one(JobTable)
                    table.move_cursor(row=table.get_row_index(key[4:]))
                    while app.selected != int(key[4:]) or not app.model.data[app.selected].loaded:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"job {key[4:]} did not load")
                        await pilot.pause(0.05)
                else:
                    await pilot.press(key)
            if isinstance(app.screen, GalleryScreen):
                while len(app.screen.query(SampleCell)) < 12 and time.monotonic() < deadline:
                    await pilot.pause(0.05)
            await pilot.pause(1.5)  # the views ask the daemon (history, log, show, resources) first
            path = out / f"tui-{name}.svg"
            app.save_screenshot(filename=path.name, path=str(out))
            saved.append(path)
    return saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/screens"))
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=48)
    names = [v[0] for v in VIEWS]
    p.add_argument("--views", nargs="+", default=[], choices=names, help="only these (default: all)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    svgs = asyncio.run(shoot(args.out, (args.width, args.height), args.views))
    convert = shutil.which("rsvg-convert")
    for svg in svgs:
        if convert:
            png = svg.with_suffix(".png")
            subprocess.run([convert, "-o", str(png), str(svg)], check=True)
            svg.unlink()
            # A terminal has few colours: a 128-colour palette keeps the docs small.
            with Image.open(png) as im:
                small = im.convert("RGB").quantize(128)
            small.save(png, optimize=True)
            print(png)
        else:
            print(svg, "(no rsvg-convert: kept as SVG)")


if __name__ == "__main__":
    main()

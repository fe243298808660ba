"""`dallm sweep CONFIG --grid KEY=V1,V2 ... [--repeat K] [--local] [--wait] [--json]`.

Expands the grid x K seeds into runs (see `dallm.sweep`), validates every one before anything is
queued, then submits them to the daemon as one sweep (their output folders under
`<home>/jobs/<sweep id>/`), or with `--local` trains them here, one after the other (`--workers N`
at a time), into `runs/<sweep id>/` (or `--out DIR`). `dallm report --sweep` compares the runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dallm.cli import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a config over a grid of values x seeds (daemon or --local)",
        description="Expand --grid KEY=V1,V2,... (repeatable) x --repeat K seeds into jobs and run them.",
    )
    p.add_argument("config", type=Path, help="job config (TOML)")
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a key and its values (repeatable)"
    )
    p.add_argument("--repeat", type=int, default=1, metavar="K", help="seeds per value: cfg.seed + 0..K-1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--id", default=None, help="the sweep id (default: <name>-<date>-<time>)")
    p.add_argument("--local", action="store_true", help="no daemon: train the runs here, in order")
    p.add_argument("--workers", type=int, default=1, help="--local: runs at a time (default 1)")
    p.add_argument("--out", type=Path, default=None, help="--local: the sweep folder (default runs/<id>)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    p.add_argument("--wait", action="store_true", help="daemon: wait for every job; non-zero if one fails")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--home", help="the daemon's home (default $DALLM_HOME, else the user data dir)")
    p.add_argument("--connect", metavar="ENDPOINT", help="tcp://HOST:PORT or ipc://.../control.ipc")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon's answer")
    p.add_argument("--json", action="store_true", help="print the sweep manifest as JSON")
    p.set_defaults(func=run)


def _emit(args: argparse.Namespace, sweep: Any, folder: Path | None) -> None:
    if args.json:
        print(json.dumps({**sweep.to_json(), "folder": str(folder) if folder else None}, default=str))
        return
    for r in sweep.runs:
        job = f"job {r.job}  " if r.job is not None else ""
        print(f"{job}{r.name}  {r.state}")
    print(f"sweep {sweep.id}: {len(sweep.runs)} runs" + (f" in {folder}" if folder else ""))


def run(args: argparse.Namespace) -> int:
    from dallm.sweep import plan_sweep, run_local, write_manifest

    mode = "local" if args.local else "daemon"
    sweep, configs = plan_sweep(
        args.config, args.grid, sets=args.set, repeat=args.repeat, sweep_id=args.id, mode=mode
    )
    if args.dry_run:
        _emit(args, sweep, None)
        return 0
    if args.local:
        folder = args.out if args.out is not None else Path("runs") / sweep.id
        log = (lambda m: print(m, file=sys.stderr)) if args.json else print
        run_local(folder, sweep, configs, workers=max(1, args.workers), log=log)
        _emit(args, sweep, folder)
        failed = [r.name for r in sweep.runs if r.state == "failed"]
        if failed:
            raise CommandError(f"{len(failed)} of {len(sweep.runs)} runs failed: {', '.join(failed)}")
        return 0
    return _submit(args, sweep, configs, write_manifest)


def _submit(args: argparse.Namespace, sweep: Any, configs: list[Any], write_manifest: Any) -> int:
    from dallm.cli.jobs import _client

    folder: Path | None = None
    with _client(args) as c:
        for r, cfg in zip(sweep.runs, configs, strict=True):
            cfg = cfg.model_copy(update={"output_dir": Path(sweep.id) / r.dir})
            job = c.submit(
                cfg,
                priority=args.priority,
                source=f"{args.config} ({r.name})",
                config_dir=Path(args.config).parent,
            )
            r.job, r.state = job.id, "submitted"
            if folder is None and job.out_dir:
                folder = Path(job.out_dir).parent
            if folder is not None and folder.parent.is_dir():  # the daemon's home is on this machine
                write_manifest(folder, sweep)
        if not args.wait:
            _emit(args, sweep, folder)
            return 0
        bad = []
        for r in sweep.runs:
            s = c.wait(r.job)
            r.state = s.state
            if s.state in ("failed", "cancelled"):
                bad.append(f"{r.name} ({s.state}: {s.reason})")
            if folder is not None and folder.parent.is_dir():
                write_manifest(folder, sweep)
    _emit(args, sweep, folder)
    if bad:
        raise CommandError(f"{len(bad)} of {len(sweep.runs)} jobs did not finish: {'; '.join(bad)}")
    return 0

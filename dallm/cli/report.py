"""`dallm report OUTPUT_DIR [--out DIR] [--json]`: the study's plots from a job folder.

`dallm report --sweep SWEEP_DIR_OR_ID [--out DIR]`: the comparison across a sweep's runs
(`dallm.report.sweep`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="plot loss, CS / CS-Fluctuation, KID and the sample evolution of a job",
        description="Write PNG plots from a job's metrics.jsonl, result.json and samples/.",
    )
    p.add_argument(
        "output_dir",
        nargs="?",
        metavar="JOB|OUTPUT_DIR",
        help="a job output folder, or a daemon job id or name (its newest finished job)",
    )
    p.add_argument("--sweep", metavar="SWEEP", help="compare a sweep's runs (its folder or id) instead")
    p.add_argument("--home", help="the daemon's home, for a JOB or a --sweep ID (default $DALLM_HOME)")
    p.add_argument("--connect", metavar="ENDPOINT", help="the daemon's control endpoint, for a JOB")
    p.add_argument(
        "--out", type=Path, default=None, help="where to write the PNGs (default: OUTPUT_DIR/report)"
    )
    p.add_argument("--json", action="store_true", help="print {plot: path or null, skipped: {plot: reason}}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dallm.cli import CommandError
    from dallm.report.job import ReportError, read_result, write_report

    if args.sweep is not None:
        return _sweep(args)
    if args.output_dir is None:
        raise CommandError("give JOB (an id or name) or OUTPUT_DIR (a job folder), or --sweep SWEEP", 2)
    from dallm.cli.jobref import resolve

    folder = resolve(args.output_dir, args.home, args.connect)
    try:
        results = write_report(folder, args.out)
    except ReportError as e:
        raise CommandError(str(e)) from None
    written = {k: str(v) for k, v in results.items() if isinstance(v, Path)}
    skipped = {k: v for k, v in results.items() if isinstance(v, str)}
    ev = read_result(folder).get("eval")
    cost = (
        {k: v for k, v in ev.items() if k.startswith(("eval_", "sample_", "wall_"))}
        if isinstance(ev, dict)
        else {}
    )
    if args.json:
        print(json.dumps({"written": written, "skipped": skipped, "eval_cost": cost}))
        return 0
    for path in written.values():
        print(path)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    if cost.get("eval_count"):
        print(
            f"evaluation cost: {cost['eval_count']:.0f} KID evaluations, {cost['eval_seconds_mean']:.1f} s each; "
            f"samples {cost.get('sample_seconds_total', 0.0):.1f} s; {100 * cost['eval_share']:.1f}% of "
            f"{cost['wall_seconds']:.0f} s"
        )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from dallm.report.sweep import find_sweep, write_sweep_report

    folder = find_sweep(args.sweep, args.home)
    results = write_sweep_report(folder, args.out)
    written = {k: str(v) for k, v in results.items() if isinstance(v, Path)}
    skipped = {k: v for k, v in results.items() if isinstance(v, str)}
    if args.json:
        print(json.dumps({"sweep": str(folder), "written": written, "skipped": skipped}))
        return 0
    for path in written.values():
        print(path)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    return 0

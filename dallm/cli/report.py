"""`dallm report OUTPUT_DIR [--out DIR] [--json]`: the study's plots from a job folder."""

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
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="the job's output folder")
    p.add_argument(
        "--out", type=Path, default=None, help="where to write the PNGs (default: OUTPUT_DIR/report)"
    )
    p.add_argument("--json", action="store_true", help="print {plot: path or null, skipped: {plot: reason}}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dallm.cli import CommandError
    from dallm.report import ReportError, write_report

    try:
        results = write_report(args.output_dir, args.out)
    except ReportError as e:
        raise CommandError(str(e)) from None
    written = {k: str(v) for k, v in results.items() if isinstance(v, Path)}
    skipped = {k: v for k, v in results.items() if isinstance(v, str)}
    if args.json:
        print(json.dumps({"written": written, "skipped": skipped}))
    else:
        for path in written.values():
            print(path)
        for name, why in skipped.items():
            print(f"{name}: skipped ({why})")
    return 0

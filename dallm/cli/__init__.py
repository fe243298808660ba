"""The `dallm` command. Each subcommand lives in its own module of this package, which exposes
`register(subparsers)`; heavy imports (torch, diffusers) happen inside the command, not here, so
`dallm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dallm import __version__

# Modules that register subcommands, in help order. A missing module registers nothing.
COMMAND_MODULES = [
    "dallm.cli.train",  # train, export
    "dallm.cli.jobs",  # submit, ls, show, logs, wait, stop, rollback, cancel, priority
    "dallm.cli.evaluate",  # kid
    "dallm.cli.report",  # report
    "dallm.cli.micro",  # micro build, synth
    "dallm.cli.sweep",  # sweep
]


class CommandError(Exception):
    """A failure to report as one line on stderr with a non-zero exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dallm", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"dallm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dallm.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (CommandError, ConfigError) as e:
        print(f"dallm {args.command}: {e}", file=sys.stderr)
        return getattr(e, "code", 1)
    except KeyboardInterrupt:
        print(f"dallm {args.command}: interrupted", file=sys.stderr)
        return 130

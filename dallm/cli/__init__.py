"""The `dallm` command. Each subcommand lives in its own module of this package, which exposes
`register(subparsers)`; heavy imports (torch, diffusers) happen inside the command, not here, so
`dallm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

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


class OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are one line, like every other error of `dallm` ("dallm export:
    argument --format: invalid choice: 'bogus' (choose from ...)"), not a usage block; `--help`
    still prints the usage. Subcommand parsers are of this class too (argparse makes them so)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dallm",
        description="Fine-tune text-to-image diffusion models with LoRA and watch every job live: KID, "
        "CS-Fluctuation early stopping, sample thumbnails; stop or roll back a job from a terminal.",
        epilog="Early stopping: CS-Fluctuation's turning point says the best checkpoint is behind you, "
        "not where it is (out of sample it behaved like a fixed stop; docs/results.md section 3): the "
        "default returns the lowest validation KID evaluated once the turning point is confirmed "
        "(monitor.select). `dallm COMMAND --help` lists a command's options; README.md has examples.",
    )
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
    from pydantic import ValidationError

    from dallm.config import ConfigError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit (a traceback)
        return code
    except (CommandError, ConfigError) as e:
        print(f"dallm {args.command}: {e}", file=sys.stderr)
        return getattr(e, "code", 1)
    except ValidationError as e:  # a request the daemon protocol refuses to build: name the field
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        print(f"dallm {args.command}: {where}: {first['msg']}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `dallm ls | head -2`: the reader is gone. Stop quietly, as other unix tools do; stdout
        # goes to /dev/null so that the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a tool ended by SIGPIPE
    except KeyboardInterrupt:
        print(f"dallm {args.command}: interrupted", file=sys.stderr)
        return 130

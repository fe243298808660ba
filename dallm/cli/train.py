"""`dallm train CONFIG` (a job in the foreground, no daemon) and `dallm export OUTPUT_DIR`."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dallm.cli import CommandError

if TYPE_CHECKING:
    from dallm.protocol import JobSummary


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="run a training job in the foreground (no daemon)")
    p.add_argument("config", type=Path, help="job config (TOML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: output_dir of the config, else runs/<name>)"
    )
    p.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue from an output folder or a checkpoint folder"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "export", help="export a job's LoRA as diffusers or kohya weights, or a peft adapter (LLM)"
    )
    e.add_argument(
        "output_dir", metavar="JOB|OUTPUT_DIR", help="a job output folder, or a daemon job id or name"
    )
    e.add_argument(
        "--home", help="the daemon's home, for a JOB (default $DALLM_HOME, else the user data dir)"
    )
    e.add_argument("--connect", metavar="ENDPOINT", help="the daemon's control endpoint, for a JOB")
    e.add_argument("--step", type=int, help="export checkpoint N instead of the result")
    e.add_argument("--format", choices=["diffusers", "kohya", "peft"], required=True)
    e.add_argument(
        "--out", type=Path, required=True, help="folder (diffusers, peft) or .safetensors file (kohya)"
    )
    e.set_defaults(func=cmd_export)


class _CtrlC:
    """First Ctrl-C: ask the engine to checkpoint and stop between steps. Second: stop at once."""

    def __init__(self) -> None:
        self.pressed = False
        self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\ninterrupt: writing a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)

    def poll(self) -> Any:
        from dallm.protocol import InterruptCommand

        return InterruptCommand() if self.pressed else None

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._old)


def _log_folder(args: argparse.Namespace, cfg: Any) -> Path:
    """Where the run writes (as `train` picks it), for the traceback of a failed run."""
    if args.out is not None:
        return Path(args.out)
    if args.resume is not None:
        resume = Path(args.resume)
        return resume.parent.parent if resume.parent.name == "checkpoints" else resume
    return Path(cfg.out)


def _failed(e: Exception, folder: Path) -> CommandError:
    """One line for the terminal; the traceback goes to a file next to the run's other output."""
    import traceback

    first = (str(e).strip().splitlines() or [""])[0][:300]
    text = "".join(traceback.format_exception(e))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "train-error.log"
        log.write_text(text)
        where = f"; traceback in {log}"
    except OSError:
        where = ""
    return CommandError(f"failed: {type(e).__name__}: {first}{where}")


def cmd_train(args: argparse.Namespace) -> int:
    from dallm.config import ConfigError, run_name
    from dallm.engine.dispatch import train
    from dallm.engine.threads import set_torch_threads
    from dallm.preflight import checked_config

    cfg = run_name(checked_config(args.config, args.overrides), args.overrides or [])
    try:
        threads = set_torch_threads()
    except ValueError as e:
        raise CommandError(str(e)) from None
    if not args.no_progress and sys.stderr.isatty():
        print(threads, file=sys.stderr)
    ctrl_c = _CtrlC()
    emit = None
    if not args.no_progress:
        from dallm.cli.progress import ProgressEmit

        emit = ProgressEmit(cfg.train.steps)
    try:
        result = train(cfg, out_dir=args.out, resume=args.resume, emit=emit, poll=ctrl_c.poll)
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a failing engine (peft, CUDA, ...): one line, never a traceback
        raise _failed(e, _log_folder(args, cfg)) from None
    finally:
        ctrl_c.restore()
        if emit is not None:
            emit.close()  # also when train() refused to start
    out = result.out_dir
    if result.reason == "interrupted":
        again = [
            "dallm",
            "train",
            str(args.config),
            *sum((["--set", o] for o in args.overrides), []),
            "--resume",
            str(out),
        ]
        print(f"interrupted at step {result.final_step}; resume with: {shlex.join(again)}", file=sys.stderr)
        return 130
    tp = f", turning point {result.turning_point}" if result.turning_point is not None else ""
    print(
        f"{result.reason}: step {result.final_step}, result = weights of step {result.result_step}{tp}; in {out}"
    )
    if result.selection:  # monitor.select = "evidence": which signal chose it, by what paired margin
        print(f"chosen: {result.selection}")
    return 0


def export_problem(folder: Path, fmt: str, job: JobSummary | None) -> str | None:
    """Why `folder` cannot be exported as `fmt`, said so that the user knows what to do instead:
    the format of the job's kind (an LLM job's adapter is `--format peft`), or a job that has no
    result (cancelled, failed, still running: a checkpoint is exported with `--step N`)."""
    from dallm.image.export import LORA_FILE
    from dallm.protocol.files import checkpoint_folders

    adapter = (folder / "adapter_config.json").is_file()  # dallm.llm.trainer.ADAPTER_CONFIG
    lora = (folder / LORA_FILE).is_file()
    what = f"job {job.id} ({job.name})" if job is not None else str(folder)
    if fmt != "peft" and adapter and not lora:
        return f"{what} is an LLM job: its result is a peft adapter; use --format peft"
    if fmt == "peft" and lora and not adapter:
        return f"{what} is an image job: use --format diffusers or --format kohya"
    if adapter or lora:
        return None
    steps = [s for s, _ in checkpoint_folders(folder / "checkpoints")]
    then = (
        f"export a checkpoint with --step N (have: {', '.join(map(str, steps))})"
        if steps
        else "no checkpoint either"
    )
    if job is not None and job.state not in ("finished", "stopped", "stopped-early"):
        return f"{what} is {job.state}: it has no result; {then}"
    return f"{what}: no result weights in this folder; {then}"


def cmd_export(args: argparse.Namespace) -> int:
    from dallm.cli.jobref import resolve_job
    from dallm.engine.checkpoint import find_checkpoint
    from dallm.image.export import export_lora, kohya_usage

    job, src = resolve_job(args.output_dir, args.home, args.connect)
    if args.step is None:
        problem = export_problem(src, args.format, job)
        if problem:
            raise CommandError(problem)
    if args.step is not None:
        try:
            src = find_checkpoint(src, args.step)
        except FileNotFoundError as e:
            raise CommandError(str(e)) from None
    try:
        if args.format == "peft":
            from dallm.llm.export import export_peft

            path = export_peft(src, args.out)
        else:
            path = export_lora(src, args.format, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(path)
    usage = kohya_usage(path) if args.format == "kohya" else None
    if usage:  # on stderr: stdout stays the one path a script reads
        print(usage, file=sys.stderr)
    return 0

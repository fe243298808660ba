"""`dallm submit / ls / show / logs / wait / stop / rollback / cancel / priority / run`: drive the daemon.

`dallm run CONFIG` is the one-command path: it starts a daemon when none runs on the home, submits
the job, shows it live (the TUI on a terminal, else a progress view) and prints where the result is.

Every command takes `--home DIR` (the daemon's home; default $DALLM_HOME, else the user data dir)
or `--connect ENDPOINT`, and `--json` for scripts. Exit codes: 0 success; 1 refused or failed
(bad config, unknown job, a waited-for job that failed or was cancelled); 3 no daemon to talk to;
2 usage. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dallm.cli import CommandError

if TYPE_CHECKING:
    from dallm.protocol import JobSummary

EXIT_UNAVAILABLE = 3


@contextmanager
def _client(args: argparse.Namespace) -> Any:
    from dallm.client.client import DaemonClient, DaemonError, DaemonUnavailable

    try:
        with DaemonClient(args.connect, home=args.home, timeout=args.timeout) as c:
            yield c
    except DaemonUnavailable as e:
        raise CommandError(str(e), EXIT_UNAVAILABLE) from None
    except DaemonError as e:
        raise CommandError(str(e), 1) from None


def _print_json(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    elif isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    print(json.dumps(obj, indent=None))


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.0f}h"
    return f"{s / 86400:.0f}d"


def _final(summary: Any, as_json: bool) -> int:
    """Report a finished wait: exit 0 for finished/stopped/stopped-early, 1 for failed/cancelled."""
    if as_json:
        _print_json(summary)
    elif summary.state in ("finished", "stopped", "stopped-early"):
        print(f"job {summary.id} {summary.state}: {summary.reason}; result in {summary.out_dir}")
    if summary.state in ("failed", "cancelled"):
        raise CommandError(f"job {summary.id} {summary.state}: {summary.reason}", 1)
    return 0


class _LineProgress:
    """Progress for logs and pipes (no terminal): a line on each state change and every 10% of the
    steps, at most one per 5 seconds, on stderr."""

    def __init__(self) -> None:
        self.state, self.tenth, self.last = "", -1, 0.0

    def __call__(self, s: Any) -> None:
        tenth = s.step * 10 // s.total_steps if s.total_steps else -1
        now = time.monotonic()
        if s.state == self.state and (tenth <= self.tenth or now - self.last < 5):
            return
        self.state, self.tenth, self.last = s.state, tenth, now
        from dallm.protocol.labels import validation_text

        kid = f"  {validation_text(s)}" if s.validation is not None else ""
        if kid and s.validation_std is not None:
            kid += " (± std of the mean)"  # the spread is named where it is shown (issue 23)
        tp = f"  turning point {s.turning_point}" if s.turning_point is not None else ""
        total = f"/{s.total_steps}" if s.total_steps else ""
        print(f"job {s.id} {s.state:<13} step {s.step}{total}{kid}{tp}", file=sys.stderr, flush=True)


def _wait(c: Any, job: int | str, timeout: float | None, as_json: bool) -> int:
    if as_json:
        return _final(c.wait(job, timeout=timeout), as_json)
    if not sys.stderr.isatty():
        return _final(c.wait(job, timeout=timeout, on_update=_LineProgress()), as_json)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("job {task.fields[job]} {task.fields[state]:<13}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[extra]}"),
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None, job=job, state="", extra="")

        from dallm.protocol.labels import validation_text

        def update(s: Any) -> None:
            extra = validation_text(s) if s.validation is not None else ""
            bar.update(task, total=s.total_steps or None, completed=s.step, state=s.state, extra=extra)

        summary = c.wait(job, timeout=timeout, on_update=update)
    return _final(summary, as_json)


# --- commands ------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from dallm.config import run_name
    from dallm.preflight import checked_config

    cfg = checked_config(args.config, args.set)  # ConfigError: one line naming the key; nothing queued
    cfg = run_name(cfg, args.set or [])  # "quickstart lr=3e-3" unless a --set names it
    with _client(args) as c:
        job = c.submit(
            cfg,
            priority=args.priority,
            retries=args.retries,
            source=str(args.config),
            config_dir=Path(args.config).parent,
        )
        if args.wait:
            if not args.json:
                print(job.id, flush=True)
            return _wait(c, job.id, None, args.json)
        _print_json(job) if args.json else print(job.id)
    return 0


def ensure_daemon(home: str | None, devices: str | None = None) -> None:
    """Start a background daemon on `home` unless one runs there."""
    import subprocess

    from dallm.client.home import DaemonPaths, lock_is_held, resolve_home

    paths = DaemonPaths(resolve_home(home))
    if lock_is_held(paths):
        return
    cmd = [sys.executable, "-m", "dallm.daemon.cli", "start", "--home", str(paths.home)]
    if devices:
        cmd += ["--devices", devices]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CommandError(
            res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "cannot start the daemon"
        )
    print(res.stdout.strip(), file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Start (or reuse) a daemon, submit, watch live (the TUI on a terminal, else a progress view)."""
    from dallm.config import run_name
    from dallm.preflight import checked_config

    cfg = run_name(checked_config(args.config, args.set), args.set or [])
    if args.connect is not None:
        return _run(args, cfg)
    ensure_daemon(args.home, args.devices)
    try:
        return _run(args, cfg)
    finally:  # `make demo` ends here: a background daemon must not be a surprise
        from dallm.client.home import resolve_home

        home = resolve_home(args.home)
        print(f"the daemon keeps running on {home}; stop it with: dallm-daemon stop --home {home}",
              file=sys.stderr)  # fmt: skip


def _run(args: argparse.Namespace, cfg: Any) -> int:
    with _client(args) as c:
        job = c.submit(
            cfg, priority=args.priority, source=str(args.config), config_dir=Path(args.config).parent
        )
        print(f"job {job.id} submitted; output in {job.out_dir}", file=sys.stderr)
        if not args.no_tui and sys.stdin.isatty() and sys.stdout.isatty():
            try:
                from dallm.tui.app import main as tui_main
            except ImportError:
                tui_main = None
            if tui_main is not None:
                where = (
                    ["--connect", args.connect]
                    if args.connect
                    else ["--home", str(args.home)]
                    if args.home
                    else []
                )
                tui_main(where)
                s = c.summary(job.id)
                from dallm.protocol import TERMINAL_STATES

                if s.state not in TERMINAL_STATES:
                    print(f"job {s.id} is {s.state}; `dallm wait {s.id}` waits for it")
                    return 0
                return _final(s, args.json)
        return _wait(c, job.id, None, args.json)


def cmd_ls(args: argparse.Namespace) -> int:
    from dallm.protocol import JOB_STATES, eta_seconds, format_seconds, phase_text, step_text
    from dallm.protocol.labels import SPREAD, fidelity_text, validation_text, value_text
    from dallm.sweep import sweep_of  # a job in a sweep folder (`dallm sweep`) belongs to that sweep

    for state in args.state or []:
        if state not in JOB_STATES:
            raise CommandError(f"--state {state}: no such state; use one of {', '.join(JOB_STATES)}", 2)
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit {args.limit}: give 1 or more", 2)

    with _client(args) as c:
        jobs = c.jobs(states=args.state or None, limit=args.limit)
    sweeps = {j.id: sweep_of(j.out_dir) for j in jobs}
    if args.sweep:
        jobs = [j for j in jobs if sweeps[j.id] == args.sweep]
    jobs.sort(key=lambda j: (sweeps[j.id] is not None, sweeps[j.id] or ""))  # sweeps grouped, after the rest
    if args.json:
        _print_json(
            [j.model_dump(mode="json") | {"sweep": sweeps[j.id], "eta_s": eta_seconds(j)} for j in jobs]
        )
        return 0
    if not jobs:
        print("no jobs")
        return 0
    now = time.time()
    # VAL: the job's validation measure by its kind (KID, ppl) ± the std of its mean; FIDELITY: prompt
    # fidelity on held-out prompts (the base model's beside it)
    head = ("ID", "NAME", "STATE", "PRIO", "STEP", f"VAL ({SPREAD.upper()})", "VAL LOSS", "FIDELITY", "ETA")
    rows = [head + ("DEVICE", "AGE", "REASON")]
    group: str | None = None
    for j in jobs:
        if sweeps[j.id] != group:
            group = sweeps[j.id]
            rows.append((f"sweep {group}:",))
        step = step_text(j)  # the trainer's step, with the evaluations behind it
        name = f"  {j.name}" if group else j.name
        phase = phase_text(j, now)
        state = f"{j.state} ({phase})" if phase else j.state
        eta = format_seconds(eta_seconds(j))
        rows.append(
            (str(j.id), name, state, str(j.priority), step, validation_text(j), value_text(j.val_loss))
            + (fidelity_text(j.fidelity, j.base_fidelity), eta, j.device or "-", _ago(j.created), j.reason)
        )
    widths = [max(len(r[i]) for r in rows if len(r) > 1) for i in range(len(rows[0]) - 1)]
    for r in rows:
        if len(r) == 1:  # a sweep's heading
            print(r[0])
            continue
        print("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1][:80])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from dallm.protocol import eta_seconds, format_seconds, peak_memory_text, phase_text, step_text

    with _client(args) as c:
        d = c.show(args.job)
    if args.json:
        _print_json(d)
        return 0
    s = d.summary
    print(f"job {s.id} {s.name}: {s.state} ({s.reason})")
    print(f"  step {step_text(s)}  priority {s.priority}  device {s.device or '-'}  attempts {s.attempts}")
    phase = phase_text(s, time.time())
    if phase:
        print(f"  phase {phase}  ETA {format_seconds(eta_seconds(s))} ({_eta_parts(s)})")
    print(f"  output {s.out_dir}")
    if s.peak_rss_mb is not None:
        print(f"  peak memory: {peak_memory_text(s)}")
    if s.history_gap:
        print(f"  history incomplete: {s.history_gap}")
    if s.turning_point is not None:
        stops = f"; stops at step {s.stop_step}" if s.stop_step is not None and s.state == "running" else ""
        print(f"  turning point: step {s.turning_point}{stops}")
    if s.result_step is not None:
        print(f"  result: step {s.result_step}")
    from dallm.protocol.labels import figures_lines

    for line in figures_lines(s):
        print(f"  {line}")
    if d.last_metrics:
        print("  last metrics: " + "  ".join(f"{k}={v:.5g}" for k, v in d.last_metrics.items()))
    if d.checkpoints:
        marks = [f"{c.step}{'*' if c.superseded else ''}" for c in d.checkpoints]
        print(
            f"  checkpoints: {', '.join(marks)}"
            + ("  (* superseded)" if any(c.superseded for c in d.checkpoints) else "")
        )
    print("  history:")
    for t in d.transitions:
        when = datetime.fromtimestamp(t.t).strftime("%Y-%m-%d %H:%M:%S")
        print(f"    {when}  {t.from_state or '-':>13} -> {t.to_state:<13} {t.reason}")
    return 0


def _eta_parts(s: JobSummary) -> str:
    """What the ETA is made of, so that a user can see evaluation counted."""
    from dallm.protocol.jobs import end_step, evaluations_left, trainer_step

    left = max(0, end_step(s) - trainer_step(s))
    speed = (
        f"{left} steps at {s.steps_per_s:.3g}/s" if s.steps_per_s else f"{left} steps, speed not measured yet"
    )
    n = evaluations_left(s)
    cost = f"{s.eval_stop_seconds:.1f} s each" if s.eval_stop_seconds is not None else "cost not measured yet"
    return f"{speed} + {n} evaluation(s), {cost}" if n else speed


def _log_line(t: float, level: str, message: str) -> str:
    return f"{datetime.fromtimestamp(t).strftime('%H:%M:%S')} {level:<7} {message}"


def cmd_logs(args: argparse.Namespace) -> int:
    from dallm.cli.eventlines import EventLines
    from dallm.protocol import QUEUE_TOPIC, TERMINAL_STATES, JobStateEvent, job_topic

    with _client(args) as c:
        rep = c.logs(args.job)
        for line in rep.lines:
            print(json.dumps(line.model_dump()) if args.json else _log_line(line.t, line.level, line.message))
        if not args.follow:
            return 0
        job = c.summary(args.job)
        if job.state in TERMINAL_STATES:
            return 0
        lines = EventLines(job.total_steps)  # the engine's progress too, not only log lines and states
        with c.subscribe([QUEUE_TOPIC, job_topic(job.id)], since=rep.head) as sub:
            for env in sub:
                ev = env.event
                line = lines(ev) if env.job == job.id else None
                if line is None:
                    continue
                level, msg = line
                if args.json:
                    print(
                        json.dumps({"seq": env.seq, "t": env.t, "level": level, "message": msg}), flush=True
                    )
                else:
                    print(_log_line(env.t, level, msg), flush=True)
                if isinstance(ev, JobStateEvent) and ev.job.state in TERMINAL_STATES:
                    return 0
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            return _wait(c, args.job, args.wait_timeout, args.json)
        except TimeoutError as e:
            raise CommandError(str(e), 1) from None


def _simple(args: argparse.Namespace, summary: Any, message: str) -> int:
    _print_json(summary) if args.json else print(message)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.stop(args.job)
    return _simple(args, s, f"job {s.id} stopping: it finishes now (turning-point weights when found)")


def cmd_rollback(args: argparse.Namespace) -> int:
    if args.step < 0:
        raise CommandError(
            f"--step {args.step}: a step is 0 or more (`dallm show {args.job}` lists checkpoints)", 2
        )
    with _client(args) as c:
        s = c.rollback(args.job, args.step, resume=args.resume)
    how = "resumes training from there" if args.resume else "finishes there"
    return _simple(args, s, f"job {s.id} rolls back to step {args.step} and {how}")


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.cancel(args.job)
    return _simple(args, s, f"job {s.id} cancelled")


def cmd_priority(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.set_priority(args.job, args.priority)
    return _simple(args, s, f"job {s.id} priority {s.priority}")


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="the daemon's home (default $DALLM_HOME, else the user data dir)")
    common.add_argument("--connect", metavar="ENDPOINT", help="tcp://HOST:PORT or ipc://.../control.ipc")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon's answer")

    p = sub.add_parser("submit", parents=[common], help="queue a job on the daemon")
    p.add_argument("config", help="job config (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--priority", type=int, default=0, help="higher runs sooner (default 0)")
    p.add_argument(
        "--retries", type=int, default=0, help="restart a crashed worker from its checkpoint N times"
    )
    p.add_argument(
        "--wait", action="store_true", help="show progress until the job ends; non-zero exit if it fails"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "run", parents=[common], help="start or reuse a daemon, submit a job and watch it live"
    )
    p.add_argument("config", help="job config (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--devices", help="for a daemon started here: 0,1 or cpu")
    p.add_argument("--no-tui", action="store_true", help="a progress view instead of the TUI")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ls", parents=[common], help="list jobs")
    p.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, help="only the newest N jobs")
    p.add_argument("--sweep", help="only the jobs of this sweep (`dallm sweep`)")
    p.set_defaults(func=cmd_ls)

    for name, func, text in (
        ("show", cmd_show, "a job's state, history, checkpoints and last metrics"),
        ("stop", cmd_stop, "finish a running job now (turning-point weights when found)"),
        ("cancel", cmd_cancel, "discard a queued or running job"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job", help="job id or name")
        p.set_defaults(func=func)

    p = sub.add_parser("logs", parents=[common], help="a job's log lines and state changes")
    p.add_argument("job")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("wait", parents=[common], help="wait for a job to end; non-zero exit if it failed")
    p.add_argument("job")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="give up after S seconds")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser(
        "rollback", parents=[common], help="restore the weights of step N; finish there or --resume"
    )
    p.add_argument("job")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--resume", action="store_true", help="continue training from step N")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("priority", parents=[common], help="change a job's priority")
    p.add_argument("job")
    p.add_argument("priority", type=int)
    p.set_defaults(func=cmd_priority)

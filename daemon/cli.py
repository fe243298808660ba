"""`dallm-daemon start [--foreground] [--home DIR] [--bind ENDPOINT] [--devices 0,1|0x2|cpu] [--max-jobs N]
[--executor local|ray [--ray-address auto|HOST:PORT|ray://HOST:PORT] [--gpus-per-job N]]`,
`dallm-daemon stop`, `dallm-daemon status`, `dallm-daemon keys [--client NAME]`.

Exit codes: 0 success; 1 error (one line on stderr); 3 `status`/`stop`: no daemon running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dallm.client.home import DaemonPaths, LockHeld, lock_is_held, resolve_home

START_TIMEOUT_S = 60.0


class Fail(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _client(paths: DaemonPaths, timeout: float = 10.0):  # noqa: ANN202 - DaemonClient, imported lazily
    from dallm.client.client import DaemonClient, DaemonUnavailable

    try:
        return DaemonClient(home=paths.home, timeout=timeout)
    except DaemonUnavailable as e:
        raise Fail(str(e), 3) from None


def cmd_start(args: argparse.Namespace) -> int:
    paths = DaemonPaths(resolve_home(args.home))
    if args.foreground:
        return run_foreground(args, paths)
    if lock_is_held(paths):
        info = paths.read_info() or {}
        print(f"dallm-daemon: already running on {paths.home} (pid {info.get('pid', '?')})", file=sys.stderr)
        return 0
    _prepare(paths)
    cmd = [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(paths.home)]
    for b in args.bind or []:
        cmd += ["--bind", b]
    if args.devices:
        cmd += ["--devices", args.devices]
    if args.max_jobs:
        cmd += ["--max-jobs", str(args.max_jobs)]
    for folder in args.allow or []:
        cmd += ["--allow", folder]
    if args.runner:
        cmd += ["--runner", args.runner]
    cmd += executor_args(args)
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    from dallm.client.client import DaemonClient, DaemonError

    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = (
                paths.log.read_text(errors="replace").strip().splitlines()[-1:] if paths.log.exists() else []
            )
            raise Fail(
                f"the daemon exited at start ({tail[0] if tail else proc.returncode}); see {paths.log}"
            )
        try:
            pong = DaemonClient(home=paths.home, timeout=1.0).ping()
            print(f"dallm-daemon: started (pid {pong.pid}) on {paths.home}, slots {','.join(pong.slots)}")
            return 0
        except DaemonError:
            time.sleep(0.1)
    raise Fail(f"the daemon did not answer within {START_TIMEOUT_S:g} s; see {paths.log}")


def _prepare(paths: DaemonPaths) -> None:
    from dallm.client.private import UnsafeFolder

    try:
        paths.prepare()
    except UnsafeFolder as e:
        raise Fail(f"cannot start: {e}") from None


def run_foreground(args: argparse.Namespace, paths: DaemonPaths) -> int:
    from dallm.daemon.executors.local import detect_devices
    from dallm.daemon.server import Daemon

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dallm.daemon.confine import parse_allow

    try:
        devices = detect_devices(args.devices)
        allow = parse_allow(args.allow)
    except ValueError as e:
        raise Fail(str(e)) from None
    os.umask(0o077)  # job outputs, logs and configs: readable by the daemon's user only
    try:
        daemon = Daemon(paths.home, devices, args.max_jobs, args.bind, args.runner, allow=allow,
                        executor=args.executor, executor_options=executor_options(args))  # fmt: skip
    except LockHeld as e:
        raise Fail(str(e)) from None
    except (RuntimeError, ValueError, OSError) as e:
        raise Fail(f"cannot start: {e}") from None
    interrupts = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        daemon.begin_shutdown(hurry=interrupts > 1)  # a second signal: stop waiting for checkpoints

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: daemon.reload_keys())
    logging.getLogger("dallm.daemon").info(
        "daemon %d on %s, slots %s, control %s%s",
        os.getpid(),
        paths.home,
        daemon.slots,
        daemon.sockets.control_endpoints,
        f"; {daemon.sched.executor.trust}" if hasattr(daemon.sched.executor, "trust") else "",
    )
    return daemon.run()


def executor_options(args: argparse.Namespace) -> dict[str, object]:
    if args.executor == "local" and (args.ray_address or args.gpus_per_job is not None or args.worker_host
                                     or args.trust_cluster):  # fmt: skip
        raise Fail("--ray-address, --gpus-per-job, --worker-host and --trust-cluster go with --executor ray")
    return {"address": args.ray_address, "gpus_per_job": args.gpus_per_job, "worker_host": args.worker_host,
            "trust_cluster": args.trust_cluster}  # fmt: skip


def executor_args(args: argparse.Namespace) -> list[str]:
    """The executor options, for the foreground daemon a background start runs."""
    executor_options(args)  # refused here, before anything starts
    out = ["--executor", args.executor]
    for flag, value in (("--ray-address", args.ray_address), ("--gpus-per-job", args.gpus_per_job),
                        ("--worker-host", args.worker_host)):  # fmt: skip
        if value is not None:
            out += [flag, str(value)]
    return out + (["--trust-cluster"] if args.trust_cluster else [])


def cmd_stop(args: argparse.Namespace) -> int:
    paths = DaemonPaths(resolve_home(args.home))
    if not lock_is_held(paths):
        raise Fail(f"no daemon running on {paths.home}", 3)
    pid = (paths.read_info() or {}).get("pid")
    from dallm.client.client import DaemonError

    try:
        print(f"dallm-daemon: {_client(paths).shutdown()}")
    except DaemonError as e:
        if not pid:
            raise Fail(str(e)) from None
        os.kill(pid, signal.SIGTERM)  # the signal handler shuts down the same graceful way
    end = time.monotonic() + args.timeout
    while lock_is_held(paths):
        if time.monotonic() > end:
            raise Fail(f"the daemon (pid {pid}) is still running after {args.timeout:g} s")
        time.sleep(0.1)
    print("dallm-daemon: stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    paths = DaemonPaths(resolve_home(args.home))
    if not lock_is_held(paths):
        if args.json:
            print(json.dumps({"running": False, "home": str(paths.home)}))
        raise Fail(f"not running on {paths.home}", 3)
    from dallm.client.client import DaemonError

    try:
        pong = _client(paths, timeout=5.0).ping()
    except DaemonError as e:
        raise Fail(f"running but not answering: {e}") from None
    if args.json:
        print(json.dumps({"running": True, **pong.model_dump(mode="json")}))
        return 0
    counts = ", ".join(f"{n} {s}" for s, n in sorted(pong.counts.items())) or "no jobs"
    print(f"dallm-daemon: running (pid {pong.pid}, up {time.time() - pong.started:.0f} s) on {pong.home}")
    print(f"  slots: {', '.join(pong.slots)}; jobs: {counts}; events: {pong.head}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from dallm.client.transport import authorized_dir, create_client_keys, server_keys

    paths = DaemonPaths(resolve_home(args.home))
    _prepare(paths)
    server_keys(paths.keys)
    print(f"server public key: {paths.keys / 'server.key'}")
    print(f"authorized client keys: {authorized_dir(paths.keys)}")
    if args.client:
        public, secret = create_client_keys(paths.keys, args.client)
        print(f"client {args.client}: {secret} (give it to the client), authorized {public.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dallm-daemon", description="The dallm job daemon.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("start", help="start the daemon (in the background unless --foreground)")
    s.add_argument("--foreground", action="store_true")
    s.add_argument("--bind", action="append", metavar="ENDPOINT",
                   help="also listen on tcp://HOST:PORT (events on PORT+1), CURVE-authenticated; beyond loopback needs client keys")  # fmt: skip
    s.add_argument(
        "--devices",
        help="0,1 (GPU indices), 0x2 (two jobs on GPU 0 when their memory fits) or cpu; "
        "default: every GPU nvidia-smi lists, else cpu",
    )
    s.add_argument("--max-jobs", type=int, help="jobs at once (CPU slots when there is no GPU; default 1)")
    s.add_argument("--allow", action="append", metavar="DIR",
                   help="jobs may read and write under DIR (besides the home's jobs/ and, for your own "
                        "CLI, the config's folder); also $DALLM_ALLOW, :-separated")  # fmt: skip
    s.add_argument("--runner", default=os.environ.get("DALLM_JOB_RUNNER"), help=argparse.SUPPRESS)
    s.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where workers run: local processes (default) or Ray tasks (docs/cluster.md)",
    )
    s.add_argument(
        "--ray-address", metavar="ADDR", help="the Ray cluster: auto (default), HOST:PORT or ray://HOST:PORT"
    )
    s.add_argument(
        "--gpus-per-job",
        type=float,
        metavar="N",
        help="Ray: GPUs per job (default 1 when the cluster has GPUs; 0.5 packs two on one)",
    )
    s.add_argument("--worker-host", metavar="HOST",
                   help="Ray: the address of this machine that nodes reach (default: the one Ray uses)")  # fmt: skip
    s.add_argument("--trust-cluster", action="store_true",
                   help="Ray: run on a cluster without token authentication; whoever reaches it gets "
                        "this daemon's user's rights (docs/cluster.md)")  # fmt: skip
    s.set_defaults(func=cmd_start)
    t = sub.add_parser("stop", help="stop gracefully: running jobs checkpoint and resume at the next start")
    t.add_argument("--timeout", type=float, default=300.0)
    t.set_defaults(func=cmd_stop)
    st = sub.add_parser("status", help="is a daemon running, and what is it doing")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    k = sub.add_parser("keys", help="CURVE keys for a TCP bind: the server's, and --client NAME")
    k.add_argument("--client", metavar="NAME")
    k.set_defaults(func=cmd_keys)
    for q in (s, t, st, k):
        q.add_argument(
            "--home", type=Path, help="the daemon's home (default $DALLM_HOME, else the user data dir)"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Fail as e:
        print(f"dallm-daemon {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Issue 13's second-user attacks, replayed against a running daemon: run as root, the attacker is
`nobody` (via `setpriv --reuid=65534 --regid=65534 --clear-groups`).

    sudo .venv/bin/python bench/attack_second_user.py [--keep]

Attacks (each prints PASS or FAIL; the exit status is 1 when any did harm, 77 when it cannot run):
- squat:     nobody pre-creates the daemon's /tmp socket folder (0777) before it starts: the daemon
             must refuse to start there, and the client must refuse to connect through it.
- tcp:       nobody talks to the loopback TCP port without a key (plaintext, and CURVE with a key of
             its own): ping, submit with an output folder in root's home, shutdown: no answer.
- ipc:       nobody connects to the daemon's IPC control socket: the 0700 folder keeps it out.
- home:      nobody reads the home: the store, the server's secret key, client keys, jobs/.
- pickle:    nobody plants a pickle `checkpoints/step-000003/state.pt` (its payload would create a
             marker file) in a folder it owns, asks for a job there and a rollback to step 3 with
             resume (refused: no way in), and root, tricked into submitting that folder, is refused
             by path confinement; the engine's checkpoint loader refuses the file (weights_only).
Issue 25's attacks (bench/attack_issue25.py): flood, links, spill, limits.
The daemon runs the fake engine (`dallm.testing.fake_engine`), with 1,024 descriptors, offline
(HF_HUB_OFFLINE), so the run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attack_issue25 as issue25  # noqa: E402 - bench/ is no package

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SKIP = 77
MARKER = "pwned-by-nobody"


class Payload:
    """What an attacker pickles: unpickling it runs `touch MARKER` (weights_only never does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


# --- the attacker's side (runs as nobody) ----------------------------------------------------------


def _answered(endpoint: str, requests: list[bytes], server_key: str | None = None) -> int:
    """How many of `requests` got any answer: plaintext, or CURVE with the server's public key (it
    is no secret) and a key pair of the attacker's own, which is not in authorized/."""
    import zmq

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        public, secret = zmq.curve_keypair()
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_key.encode(), public, secret
    s.connect(endpoint)
    answered = 0
    for frame in requests:
        try:
            s.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            continue  # no handshake completed: nothing can even be sent
        if s.poll(1500, zmq.POLLIN):
            s.recv_multipart()
            answered += 1
    s.close(0)
    return answered


def _requests(victim_dir: Path, planted: Path) -> list[bytes]:
    from dallm.protocol import (
        PingRequest,
        RollbackRequest,
        ShutdownRequest,
        SubmitRequest,
        encode_request,
    )

    job = {"name": "evil", "train": {"steps": 5}, "data": {"dir": str(planted)}}
    return [
        encode_request(1, PingRequest()),
        encode_request(2, SubmitRequest(config=job | {"output_dir": str(victim_dir / "evil")})),
        encode_request(3, SubmitRequest(config=job | {"output_dir": str(planted)})),
        encode_request(4, RollbackRequest(job="1", step=3, resume=True)),
        encode_request(5, ShutdownRequest()),
    ]


def attacker(args: argparse.Namespace) -> dict[str, object]:
    """One attack as nobody; a dict of what it managed (all zero / False when it did no harm)."""
    if args.attack == "flood":
        return issue25.flood(int(args.tcp))
    if args.attack == "links":
        return issue25.plant_links(Path(args.planted), json.loads(args.targets))
    if args.attack == "plant":
        return issue25.plant_in(Path(args.planted), args.name, args.text)
    from dallm.client.home import DaemonPaths

    paths = DaemonPaths(Path(args.home))
    sock_dir = Path(args.sock_dir)  # root's: /tmp/dallm-0-<hash of the home>, predictable
    planted = Path(args.planted)
    if args.attack == "squat":
        sock_dir.mkdir(mode=0o777)
        os.chmod(sock_dir, 0o777)
        return {"created": str(sock_dir)}
    if args.attack == "tcp":
        reqs = _requests(Path(args.home), planted)
        return {
            "plaintext answers": _answered(args.tcp, reqs),
            "own-key answers": _answered(args.tcp, reqs, args.server_key),
        }
    if args.attack == "ipc":
        try:
            os.listdir(sock_dir)
            listed = True
        except OSError:
            listed = False
        return {"listed socket folder": listed,
                "answers": _answered(f"ipc://{sock_dir / 'control.ipc'}", _requests(Path(args.home), planted))}  # fmt: skip
    if args.attack == "home":
        read = []
        for p in [paths.db, paths.keys / "server.key_secret", paths.keys / "clients", paths.jobs, paths.info]:
            try:
                os.listdir(p) if p.is_dir() else p.read_bytes()
                read.append(str(p))
            except OSError:
                pass
        return {"read": read}
    if args.attack == "pickle":
        folder = planted / "checkpoints" / "step-000003"
        folder.mkdir(parents=True)
        with open(folder / "state.pt", "wb") as f:
            pickle.dump(Payload(Path(args.marker)), f)
        os.chmod(planted, 0o777)  # "shared" with the victim, as an attacker would
        answers = _answered(args.tcp, _requests(Path(args.home), planted), args.server_key)
        return {"planted": str(folder / "state.pt"), "answers": answers}
    raise SystemExit(f"unknown attack {args.attack!r}")


# --- the victim's side (root) ----------------------------------------------------------------------


def as_nobody(args: list[str]) -> dict[str, object]:
    cmd = [*NOBODY, sys.executable, str(Path(__file__).resolve()), "--attacker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    if res.returncode != 0:
        raise RuntimeError(f"attacker failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:  # the event socket takes the next port
        if s.connect_ex(("127.0.0.1", port + 1)) == 0:
            return free_port()
    return port


def _few_descriptors() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (issue25.DAEMON_FDS, issue25.DAEMON_FDS))


def start_daemon(home: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    """The daemon, with few descriptors (a flood fills them at once), until it answers."""
    from dallm.client.client import DaemonClient, DaemonError

    cmd = [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(home),
           "--bind", f"tcp://127.0.0.1:{port}"]  # fmt: skip
    log = open(home.parent.parent / "daemon.log", "ab")  # noqa: SIM115 - the daemon's, for a failure
    daemon = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=_few_descriptors)  # fmt: skip
    end = time.monotonic() + 30
    while True:
        try:
            with DaemonClient(home=home, timeout=2) as c:
                c.ping()
            return daemon
        except DaemonError:
            if time.monotonic() > end or daemon.poll() is not None:
                raise RuntimeError(f"the daemon did not start: see {log.name}") from None
            time.sleep(0.2)


def stop_daemon(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)


@dataclass
class Owner:
    """Root's client and its job configs (for bench/attack_issue25.py)."""

    c: Any
    data: Path

    def job_config(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "train": {"steps": 5},
            "data": {"dir": str(self.data), "instance_prompt": "a red circle"},
        }

    def wait_end(self, job: int) -> Any:
        end = time.monotonic() + 60
        while (s := self.c.summary(job)).state not in ("finished", "failed", "cancelled"):
            if time.monotonic() > end:
                raise RuntimeError(f"job {job} did not end ({s.state})")
            time.sleep(0.1)
        return s


def victim(keep: bool) -> int:
    if os.geteuid() != 0:
        print("SKIP: run as root (the attacker is the second user `nobody`, via setpriv)")
        return SKIP
    if shutil.which("setpriv") is None:
        print("SKIP: setpriv (util-linux) is not installed")
        return SKIP
    import zmq.auth

    from dallm.client.client import DaemonClient, DaemonError
    from dallm.client.home import DaemonPaths

    base = Path(tempfile.mkdtemp(prefix="dallm-attack-"))
    os.chmod(base, 0o755)  # the attacker may walk up to the home, as in a shared /home
    home = base / ("x" * 90) / "h"  # long: the sockets go to a predictable /tmp/dallm-0-<hash>
    home.parent.mkdir(mode=0o755)
    planted = base / "shared"  # nobody's folder, which root is tricked into using
    marker = base / MARKER
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    allowed = base / "allowed"
    allowed.mkdir(mode=0o755)
    shared = allowed / "shared"  # a folder every user may write in, as /tmp (issue 25's links, spill)
    shared.mkdir()
    os.chmod(shared, 0o1777)
    data = allowed / "data"
    data.mkdir(mode=0o700)
    from dallm.testing.fake_engine import tiny_png

    for i in range(2):  # the submit preflight wants images; the fake engine reads none
        (data / f"{i}.png").write_bytes(tiny_png(32, 32))
    paths = DaemonPaths(home)
    shutil.rmtree(paths.socket_dir, ignore_errors=True)
    env = dict(os.environ, DALLM_JOB_RUNNER="dallm.testing.fake_engine:train", DALLM_ALLOW=str(allowed),
               HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(base / "hub-cache"))  # fmt: skip
    env.pop("DALLM_CONNECT", None)
    common = [
        "--home",
        str(home),
        "--sock-dir",
        str(paths.socket_dir),
        "--planted",
        str(planted),
        "--marker",
        str(marker),
    ]
    results: list[tuple[str, bool, str]] = []
    daemon: subprocess.Popen | None = None
    try:
        # squat: nobody creates the socket folder first
        as_nobody(["--attack", "squat", *common])
        port = free_port()
        res = subprocess.run(
            [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(home)],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
        refused = res.returncode != 0 and "refusing" in res.stderr
        try:
            DaemonClient(paths.endpoint("control"), timeout=1).ping()
            client_ok = False
        except DaemonError as e:
            client_ok = e.code == "unsafe"
        results.append(
            ("squat", refused and client_ok, res.stderr.strip().splitlines()[-1] if res.stderr else "")
        )
        shutil.rmtree(paths.socket_dir)

        daemon = start_daemon(home, env, port)
        server_public, _ = zmq.auth.load_certificate(paths.keys / "server.key")
        tcp = [
            "--tcp",
            f"tcp://127.0.0.1:{port}",
            f"--server-key={server_public.decode()}",
        ]  # z85 may start with "-"

        got = as_nobody(["--attack", "tcp", *common, *tcp])
        results.append(("tcp", got == {"plaintext answers": 0, "own-key answers": 0}, json.dumps(got)))
        got = as_nobody(["--attack", "ipc", *common, *tcp])
        results.append(("ipc", got == {"listed socket folder": False, "answers": 0}, json.dumps(got)))
        got = as_nobody(["--attack", "home", *common, *tcp])
        results.append(("home", got == {"read": []}, json.dumps(got)))

        got = as_nobody(["--attack", "pickle", *common, *tcp])
        harm = [f"nobody got {got['answers']} answer(s)"] if got["answers"] else []
        refusals: list[str] = []
        with DaemonClient(home=home, timeout=10) as c:  # root, tricked into nobody's folder
            cfg = {"name": "tricked", "train": {"steps": 5}, "data": {"dir": str(data), "instance_prompt": "a red circle"},
                   "output_dir": str(planted)}  # fmt: skip
            try:
                c.submit(cfg)
                harm.append(f"the daemon accepted output_dir {planted}")
            except DaemonError as e:
                if e.code != "invalid_config" or "output_dir" not in str(e):
                    harm.append(f"refused for another reason ({e.code}: {e})")
                refusals.append(str(e))
        from dallm.engine.checkpoint import load_checkpoint

        try:
            with warnings.catch_warnings():  # torch notes the pickle protocol it is refusing
                warnings.simplefilter("ignore")
                load_checkpoint(planted / "checkpoints" / "step-000003")
            harm.append("the checkpoint loader accepted the pickle")
        except ValueError as e:
            refusals.append(str(e))
        if marker.exists():
            harm.append(f"the payload ran: {marker} exists")
        with DaemonClient(home=home, timeout=5) as c:
            c.ping()  # still up: nobody's shutdown did not reach it
        results.append(("pickle", not harm, "; ".join(harm or [json.dumps(got), *refusals])))

        script = str(Path(__file__).resolve())
        results.append(("flood", *issue25.check_flood(NOBODY, script, port, home)))
        with DaemonClient(home=home, timeout=10) as c:
            owner = Owner(c, data)
            results.append(("links", *issue25.check_links(as_nobody, owner, shared, base)))
            job = c.submit(owner.job_config("spilled") | {"output_dir": str(shared / "exp3")}).id
            owner.wait_end(job)
            head = c.ping().head
        stop_daemon(daemon)
        outside = base / "outside"
        issue25.plant_spill(as_nobody, shared / "exp3", job, head, outside)
        daemon = start_daemon(home, env, port)
        with DaemonClient(home=home, timeout=10) as c:
            results.append(("spill", *issue25.check_spill(Owner(c, data), job, outside)))
            results.append(("limits", *issue25.check_limits(Owner(c, data), home)))
    finally:
        if daemon is not None:
            stop_daemon(daemon)
        shutil.rmtree(paths.socket_dir, ignore_errors=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) and len(results) == 9 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--keep", action="store_true", help="keep the temp folder (home, daemon.log)")
    p.add_argument("--attacker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--attack", "--home", "--sock-dir", "--planted", "--marker", "--tcp", "--server-key",
                 "--targets", "--name", "--text"):  # fmt: skip
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attacker:
        print(json.dumps(attacker(args)))
        return 0
    return victim(args.keep)


if __name__ == "__main__":
    sys.exit(main())

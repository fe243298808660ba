"""Issue 25's attacks for bench/attack_second_user.py: both sides of each (the attacker's moves run
as `nobody`; the victim's checks run as root against the running daemon).

- flood:  nobody holds 3,000 connections (never a handshake) on the daemon's TCP ports while the
          daemon runs with 1,024 descriptors: the owner's IPC requests and a peer already connected
          are answered throughout, and the daemon lives.
- links:  nobody makes `shared/exp1/` (in a 1777 allowed folder) with `job-config.json`,
          `metrics.jsonl` and `worker.log` linked to root's files: root's submit there is refused in
          one line naming the folder, no root file is written; a job folder the daemon made is
          closed to nobody, and `worker_log` returns the job's log, not a planted link's target.
- spill:  a job folder given to nobody (as a daemon before issue 25 accepted it) gets nobody's spill
          file (a forged row, `state: queued`, `out_dir` outside every root): after a restart the
          daemon replays none of it.
- limits: what a key holder's client may send: `lr = Infinity` in raw JSON, `batch_size = 10**9`,
          an unfetchable hub id while offline, 100 subscribers past the cap: refused or capped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLOOD_PER_PORT = 1500
FLOOD_HOLD_S = 6.0
DAEMON_FDS = 1024


def flood(port: int) -> dict[str, object]:
    """Attacker: connections that never handshake, on the control and event ports, held a while."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for p in (port, port + 1):
        for _ in range(FLOOD_PER_PORT):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", p))
            held.append(s)
    print(json.dumps({"held": len(held)}), flush=True)
    time.sleep(FLOOD_HOLD_S)
    return {"held": len(held)}


def plant_links(folder: Path, targets: dict[str, str]) -> dict[str, object]:
    """Attacker: `folder` (0777) with links to root's files."""
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    for name, target in targets.items():
        (folder / name).symlink_to(target)
    return {"planted": sorted(targets)}


def plant_in(folder: Path, name: str, text: str) -> dict[str, object]:
    """Attacker: a file (or a link, `text` starting with "->") in a folder that may be root's."""
    try:
        if text.startswith("->"):
            (folder / name).symlink_to(text[2:])
        else:
            (folder / name).write_text(text)
        return {"written": True}
    except OSError as e:
        return {"written": False, "error": e.strerror}


# --- the victim's side (root) ----------------------------------------------------------------------


def check_flood(nobody: list[str], script: str, port: int, home: Path) -> tuple[bool, str]:
    from dallm.client.client import DaemonClient, DaemonError

    answers, problems = 0, []
    with DaemonClient(f"tcp://127.0.0.1:{port}", home=home, timeout=5) as peer:
        peer.ping()
        cmd = [*nobody, sys.executable, script, "--attacker", "--attack", "flood", "--tcp", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd="/")
        assert proc.stdout is not None
        held = json.loads(proc.stdout.readline() or "{}").get("held", 0)
        for _ in range(4):
            time.sleep(1.0)
            try:
                with DaemonClient(home=home, timeout=5) as owner:
                    owner.jobs()
                peer.ping()
                answers += 1
            except DaemonError as e:
                problems.append(f"{e.code}: {e}")
        proc.wait(FLOOD_HOLD_S + 30)
    return answers == 4 and held > 0, f"{held} connections held; {answers}/4 rounds answered " + "; ".join(
        problems
    )


def check_links(run_nobody, client, shared: Path, base: Path) -> tuple[bool, str]:  # noqa: ANN001
    from dallm.client.client import DaemonError

    victim, secret = base / "root-owned.txt", base / "root-secret.txt"
    victim.write_text("root's\n")
    os.chmod(victim, 0o644)
    secret.write_text("root's secret\n")
    os.chmod(secret, 0o600)
    new = base / "root-new.jsonl"
    harm: list[str] = []
    targets = {"job-config.json": str(victim), "metrics.jsonl": str(new), "worker.log": str(secret)}
    run_nobody(["--attack", "links", "--planted", str(shared / "exp1"), "--targets", json.dumps(targets)])
    cfg = client.job_config("tricked")
    try:
        client.c.submit(cfg | {"output_dir": str(shared / "exp1")})
        harm.append("the submit into nobody's folder was accepted")
    except DaemonError as e:
        if e.code != "invalid_config" or str(shared / "exp1") not in str(e):
            harm.append(f"refused for another reason ({e.code}: {e})")
    job = client.c.submit(cfg | {"output_dir": str(shared / "exp2")})
    client.wait_end(job.id)
    got = run_nobody(["--attack", "plant", "--planted", str(shared / "exp2"), "--name", "worker.log.1",
                      f"--text=->{secret}"])  # fmt: skip
    if got.get("written"):
        harm.append("nobody planted a link in a job folder the daemon made")
    log = client.c.worker_log(job.id).text
    if "secret" in log:
        harm.append("worker_log returned root's secret")
    if victim.read_text() != "root's\n" or new.exists():
        harm.append("a root file was written through a planted link")
    return not harm, "; ".join(harm) or "refused in one line; job folder 0700; worker_log its own"


def plant_spill(run_nobody, out: Path, job: int, head: int, outside: Path) -> None:  # noqa: ANN001
    """As a daemon before issue 25 left it: the folder nobody's; nobody's forged spill line in it."""
    from dallm.daemon.spill import SPILL_FILE, encode_line
    from dallm.protocol import LogEvent, job_topic

    os.chown(out, 65534, 65534)
    os.chmod(out, 0o777)
    row = (head + 1, 0, job, job_topic(job), "log", None, time.time(),
           LogEvent(level="info", message="forged").model_dump_json(), None)  # fmt: skip
    line = encode_line(99, job, [row], {"state": "queued", "out_dir": str(outside)}).decode()
    run_nobody(["--attack", "plant", "--planted", str(out), "--name", SPILL_FILE, f"--text={line}"])


def check_spill(client: Any, job: int, outside: Path) -> tuple[bool, str]:
    s = client.c.summary(job)
    forged = [x for x in client.c.logs(job).lines if x.message == "forged"]
    harm = [f"job is {s.state}"] if s.state != "finished" else []
    harm += ["the forged row is in the history"] if forged else []
    harm += [f"{outside} was created"] if outside.exists() else []
    return not harm, "; ".join(harm) or "not replayed"


def check_limits(client: Any, home: Path) -> tuple[bool, str]:
    import zmq

    from dallm.client.client import DaemonError
    from dallm.client.home import DaemonPaths
    from dallm.daemon.gate import MAX_SUBSCRIBERS

    harm: list[str] = []
    cfg = client.job_config("limits")
    raw = json.dumps({"v": 1, "id": 1, "req": {"op": "submit", "config": cfg}}).replace(
        '"steps": 5', '"steps": 5, "lr": Infinity'
    )
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(DaemonPaths(home).endpoint("control"))
    s.send(raw.encode())
    rep = json.loads(s.recv_multipart()[0])["rep"] if s.poll(5000) else {}
    s.close(0)
    if rep.get("code") != "bad_request":
        harm.append(f"lr = Infinity: {rep}")
    for key, value, word in (
        ("train", {"batch_size": 10**9}, "batch_size"),
        ("model", {"base": "nosuch/model"}, "hub id"),
    ):
        try:
            client.c.submit(cfg | {key: cfg.get(key, {}) | value})
            harm.append(f"{key} {value} accepted")
        except DaemonError as e:
            if e.code != "preflight_failed" or word not in str(e):
                harm.append(f"{key} {value}: {e.code}: {e}")
    ctx = zmq.Context()
    subs = [ctx.socket(zmq.SUB) for _ in range(MAX_SUBSCRIBERS + 36)]
    for sub in subs:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(DaemonPaths(home).endpoint("events"))
    time.sleep(1.0)
    client.wait_end(client.c.submit(client.job_config("heard")).id)
    heard = sum(1 for sub in subs if sub.poll(200))
    for sub in subs:
        sub.close(0)
    ctx.term()
    if heard > MAX_SUBSCRIBERS:
        harm.append(f"{heard} subscribers served (cap {MAX_SUBSCRIBERS})")
    return not harm, "; ".join(harm) or f"refused; {heard} of {len(subs)} subscribers served"

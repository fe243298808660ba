"""The Ray executor (`dallm-daemon start --executor ray --ray-address auto|HOST:PORT|ray://HOST:PORT`):
one Ray task per job attempt, which runs the same worker program (daemon/worker.py) as a child
process on whichever node Ray picks, with `num_gpus` GPUs (`--gpus-per-job`, default 1 when the
cluster has GPUs; a fraction such as 0.5 packs jobs on one GPU) and 1 CPU.

A task, not an actor: a task holds its resources only while it runs, so a queue of jobs longer than
the cluster never deadlocks. Ray does not retry it (max_retries=0): the daemon decides (a job whose
node died is queued again and resumes from its last checkpoint, a new attempt).

The worker talks to the daemon over TCP with CURVE through the relay (daemon/executors/relay.py)
with a key pair made for that job attempt. Job folders (checkpoints, logs, the job's config) must be
on storage every node sees: checked at start (a marker file the daemon writes, read back by a task
on every node) and by each task (the job's config, by its hash). See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dallm.daemon.executors.ray_trust import SECRET_FILE, check_trust, read_secret
from dallm.daemon.executors.relay import Relay
from dallm.daemon.executors.spec import WorkerSpec
from dallm.jobfiles import NOFOLLOW, append_fd, write_file

log = logging.getLogger("dallm.daemon")
MARKER = ".dallm-shared-check"
PROBE_TIMEOUT_S = 60.0
# Passed on to the worker: the settings of dallm itself, not the keys a client uses.
_NOT_FORWARDED = {"DALLM_CLIENT_KEY", "DALLM_SERVER_KEY", "DALLM_CONNECT", "DALLM_HOME"}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'dallm[ray]'") from None
    return ray


def run_worker(argv: list[str], env: dict[str, str], log_path: str, config: str, digest: str) -> dict:
    """The Ray task: checks the job folder is the daemon's, runs the worker as its child, returns
    {"code": exit code, "placement": ..., "error": one line or None}. A cancel (KeyboardInterrupt
    from ray.cancel) ends the worker with SIGTERM, then SIGKILL."""
    import subprocess

    import ray

    node = ray.util.get_node_ip_address()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    # The node's id too: several nodes may share an address (containers, a test cluster).
    placement = f"node {node} ({ray.get_runtime_context().get_node_id()[:8]})"
    placement += f" GPU {','.join(gpus)}" if gpus else ""
    try:
        same = hashlib.sha256(Path(config).read_bytes()).hexdigest() == digest
    except OSError:
        same = False
    if not same:
        return {"code": 2, "placement": placement,
                "error": f"{config} is not the daemon's on node {node}: job folders must be on storage "
                         "every node sees (docs/cluster.md)"}  # fmt: skip
    full = {
        **os.environ,
        **env,
        "DALLM_PLACEMENT": placement,
        "PYTHONUNBUFFERED": "1",
        "DALLM_WORKER_SECRET_KEY": read_secret(Path(log_path).parent),
    }  # not a task argument
    with os.fdopen(append_fd(Path(log_path).parent, Path(log_path).name), "ab") as out:  # no planted link
        proc = subprocess.Popen([*argv, "--parent", str(os.getpid())], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full, cwd=str(Path(config).parent),
                                start_new_session=True)  # fmt: skip
    try:
        while proc.poll() is None:  # a sleep loop: a KeyboardInterrupt is raised between bytecodes
            time.sleep(0.2)
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return {"code": proc.returncode, "placement": placement, "error": None}


def write_marker(folder: Path, token: str) -> Path:
    """The shared-storage marker, in a folder made fresh for it (mkdir fails on anything planted
    there; 0755 and 0644: nodes may run as another user) and created O_EXCL without following a link."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{MARKER}-{token[:12]}"
    probe.mkdir(mode=0o755)
    fd = os.open(probe / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return probe / "token"


def probe_marker(path: str) -> str:
    """A probe task: the marker's text as this node sees it ("" when it cannot read it, or it is a link)."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as f:
            return f.read(256).decode(errors="replace")
    except OSError:
        return ""


class RayHandle:
    pid: int | None = None  # the worker runs on some node: nothing to signal on this machine

    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray, self.ref = ray, ref
        self.nodes = _alive_nodes(ray)  # a crash is a lost node only when one of these has died
        self.returncode: int | None = None
        self.lost: str | None = None
        self.error: str | None = None
        self.forced = False

    def poll(self) -> int | None:
        if self.returncode is not None or self.lost is not None:
            return self.returncode if self.lost is None else -1
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        ex = self.ray.exceptions
        try:
            out = self.ray.get(self.ref)
            self.returncode, self.error = out["code"], out["error"]
        except ex.TaskCancelledError:
            self.returncode = -(signal.SIGKILL if self.forced else signal.SIGTERM)
        except (ex.NodeDiedError, ex.LocalRayletDiedError, ex.ObjectLostError) as e:
            self.lost = f"its Ray node was lost ({type(e).__name__})"
        except ex.WorkerCrashedError:
            # A crashed Ray worker: its node went away, or the process was killed on a live node.
            self.lost = "its Ray node was lost" if self.nodes - _alive_nodes(self.ray) else None
            self.returncode = -signal.SIGKILL
        except ex.RayError as e:
            self.returncode, self.error = 1, f"Ray task failed: {str(e).strip().splitlines()[0]}"
        return self.returncode if self.lost is None else -1

    def signal(self, sig: int) -> None:
        self.forced = self.forced or sig == signal.SIGKILL
        with contextlib.suppress(Exception):  # already ended: nothing to cancel
            self.ray.cancel(self.ref, force=sig == signal.SIGKILL)


def _alive_nodes(ray: Any) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class RayExecutor:
    name = "ray"

    def __init__(self, address: str, folders: list[Path], gpus_per_job: float | None = None,
                 worker_host: str | None = None, trust_cluster: bool = False) -> None:  # fmt: skip
        self.ray = ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        resources = ray.cluster_resources()
        self.cluster_gpus = float(resources.get("GPU", 0))
        if gpus_per_job is not None and not 0 <= gpus_per_job <= max(self.cluster_gpus, 0):
            raise ValueError(f"--gpus-per-job {gpus_per_job:g}: the cluster has {self.cluster_gpus:g} GPU(s)")
        self.gpus = gpus_per_job if gpus_per_job is not None else (1.0 if self.cluster_gpus else 0.0)
        self.host = worker_host or ray.util.get_node_ip_address()
        self.trust = check_trust(ray, trust_cluster)  # before any job: an open cluster is refused
        log.log(logging.WARNING if "TRUSTED" in self.trust else logging.INFO, "%s", self.trust)
        check_shared(ray, folders)
        self.secrets: dict[bytes, Path] = {}  # identity -> its secret's file, until released
        self.remote = ray.remote(max_retries=0)(run_worker)
        self.relay: Relay | None = None

    def slots(self, devices: list[str], max_jobs: int | None) -> list[str]:
        """As many jobs at once as the cluster's GPUs hold (`--max-jobs` caps it); on a CPU cluster,
        one per node unless --max-jobs says more."""
        if max_jobs:
            n = max_jobs
        elif self.gpus:
            n = int(self.cluster_gpus / self.gpus + 1e-9)
        else:
            n = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        return ["ray"] * max(1, n)

    def endpoint(self, default: str) -> str:
        if self.relay is None:
            self.relay = Relay(f"tcp://{self.host}", default)
        return self.relay.endpoint

    def start(self, spec: WorkerSpec) -> RayHandle:
        assert self.relay is not None
        identity = f"{spec.job}.{spec.attempt}".encode()
        public, secret = self.relay.add(identity)
        env = {k: v for k, v in os.environ.items() if k.startswith("DALLM_") and k not in _NOT_FORWARDED}
        env |= spec.env | {
            "DALLM_WORKER_SERVER_KEY": self.relay.public.decode(),
            "DALLM_WORKER_PUBLIC_KEY": public.decode(),
        }
        # The secret goes through the job folder (0600, the daemon's user's): a task's arguments
        # are readable by every user of the cluster (daemon/executors/ray_trust.py).
        write_file(spec.out, SECRET_FILE, secret)
        self.secrets[identity] = spec.out / SECRET_FILE
        digest = hashlib.sha256(spec.config.read_bytes()).hexdigest()
        task = self.remote.options(
            num_gpus=self.gpus, num_cpus=1, name=f"dallm-job-{spec.job}.{spec.attempt}"
        )
        # No --slot-cores: the daemon's cores say nothing of the node's. Ray sets OMP_NUM_THREADS to
        # the task's num_cpus, which the worker follows (dallm/engine/threads.py).
        argv = replace(spec, slot_cores=None).argv(None)
        ref = task.remote(argv, env, str(spec.log), str(spec.config), digest)
        return RayHandle(self.ray, ref)

    def release(self, identity: bytes) -> None:
        if self.relay is not None:
            self.relay.remove(identity)
        secret = self.secrets.pop(identity, None)
        if secret is not None:
            with contextlib.suppress(OSError):
                secret.unlink()

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
        with contextlib.suppress(Exception):
            self.ray.shutdown()


def check_shared(ray: Any, folders: list[Path]) -> None:
    """Refuse to start unless every live node reads each folder's marker as this daemon wrote it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(probe_marker)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for folder in folders:
        token = secrets.token_hex(16)
        marker = write_marker(folder, token)
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the shared-storage check of {folder} got no answer from every Ray node "
                               f"within {PROBE_TIMEOUT_S:g} s") from None  # fmt: skip
        finally:
            with contextlib.suppress(OSError):
                marker.unlink()
            with contextlib.suppress(OSError):
                marker.parent.rmdir()
        blind = sorted(node for node, text in seen.items() if text != token)
        if blind:
            raise RuntimeError(f"{folder} is not on storage every Ray node sees (node {', '.join(blind)} "
                               "reads something else); put job folders on shared storage (docs/cluster.md)")  # fmt: skip

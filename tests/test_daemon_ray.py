# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""The Ray executor against a local Ray cluster (one per test session: a head node and two 1-GPU
nodes in this machine, ray.cluster_utils.Cluster; Ray hands out GPU ids without GPUs). Jobs use the
fake engine. The daemon is a child process connected to the cluster like a remote one would be; its
workers reach it over TCP with CURVE (daemon/executors/relay.py).

All tests of this file run in one xdist worker (the cluster is per process)."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProc, config, home, metric_steps, wait_state, wait_step  # noqa: F401
from ray.cluster_utils import Cluster

from dallm.cli import main as dallm_main
from dallm.tui.widgets import JobTable

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.ray]
# CI runs the first test (~1 min with the cluster's start on 2 cores); the others take ~4 min more
# and run with DALLM_RAY_SLOW=1 (docs/cluster.md, "What was tested").
cluster_slow = pytest.mark.skipif(
    os.environ.get("DALLM_RAY_SLOW") != "1", reason="slow Ray cluster test: set DALLM_RAY_SLOW=1"
)
STORE_BYTES = 80 * 2**20  # the object store's least: the jobs pass small dicts only


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """With Ray's token authentication (issue 25: the daemon refuses an open cluster); the token in
    the environment, which the daemons of these tests inherit."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # this process reads its mode and token again (as Ray's own setup does)
    AuthenticationTokenLoader.instance().reset_cache()
    temp = str(Path(tempfile.mkdtemp(prefix="ray-")) / "r")  # Ray makes it 0777: in a 0700 folder
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": temp,
                "object_store_memory": STORE_BYTES, "include_dashboard": False})  # fmt: skip
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1, object_store_memory=STORE_BYTES)
    c.wait_for_nodes()
    yield c
    c.shutdown()
    del os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]


@pytest.fixture
def ray_daemons(home: Path, cluster: Cluster) -> Iterator[Callable[..., DaemonProc]]:
    started: list[DaemonProc] = []

    def start(*args: str, **kw: Any) -> DaemonProc:
        d = DaemonProc(home, "--executor", "ray", "--ray-address", cluster.address, "--worker-host",
                       "127.0.0.1", *args, **kw)  # fmt: skip
        started.append(d)
        return d.start(timeout=180)  # connecting and the shared-storage probe on 3 nodes: slow at load

    yield start
    for d in started:
        d.cleanup()


def test_two_jobs_run_as_ray_tasks_and_finish(ray_daemons, home: Path, capsys) -> None:
    d = ray_daemons(step_s=0.01)
    with d.client() as c:
        assert c.ping().slots == ["ray", "ray"]  # two 1-GPU nodes: two jobs at once
        jobs = [c.submit(config(name, steps=20, every=5)).id for name in ("a", "b")]
        done = [wait_state(c, job, "finished", timeout=120) for job in jobs]
        for s in done:
            assert s.step == 20 and s.reason == "completed 20 steps"
            assert re.fullmatch(r"cpu @ node \S+ \([0-9a-f]{8}\) GPU 0", s.device), s.device
            assert metric_steps(c, s.id) == list(range(1, 21))
            assert [k.step for k in c.show(s.id).checkpoints] == [5, 10, 15, 20]
        assert done[0].device != done[1].device  # one on each node
        assert "started on ray (attempt 1, from step 0)" in [t.reason for t in c.show(jobs[0]).transitions]
    # The placement shows in `dallm ls`, `dallm show` and the TUI's queue (its Device column).
    assert dallm_main(["ls", "--home", str(home)]) == 0
    assert done[0].device in capsys.readouterr().out
    assert dallm_main(["show", str(jobs[1]), "--home", str(home)]) == 0
    assert f"device {done[1].device}" in capsys.readouterr().out
    assert JobTable.cells(done[0])["device"] == done[0].device


@pytest.mark.slow
@cluster_slow
def test_stop_rollback_checkpoint_cancel_on_ray_jobs(ray_daemons) -> None:
    d = ray_daemons(step_s=0.05)
    with d.client() as c:
        a = c.submit(config("a-tp.4", steps=2000, every=5)).id
        b = c.submit(config("b", steps=2000, every=5)).id
        wait_step(c, a, 10, timeout=120)
        c.stop(a)
        s = wait_state(c, a, "stopped", timeout=60)
        assert s.result_step == 4 and "result is step 4" in s.reason
        wait_step(c, b, 12, timeout=120)
        c.rollback(b, 5, resume=True)  # the job resumes at 5: the history after it is superseded
        wait_step(c, b, 14, timeout=60)
        assert metric_steps(c, b)[:14] == list(range(1, 15))
        c.checkpoint(b)
        c.cancel(b)
        s = wait_state(c, b, "cancelled", timeout=60)
        c.rollback(b, 10)  # a rollback of an ended Ray job runs a Ray task that writes step 10's result
        s = wait_state(c, b, "stopped", timeout=120)
        assert s.result_step == 10 and s.reason == "rolled back to step 10"
        assert json.loads((Path(s.out_dir) / "result.json").read_text())["result_step"] == 10


def worker_pids(home: Path) -> list[int]:
    """Worker processes of this home (their --out is under it), on this machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if b"dallm.daemon.worker" in cmd and str(home).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def _node_of(cluster: Cluster, device: str) -> Any:
    for node in cluster.worker_nodes:
        if f"({node.node_id[:8]})" in device:
            return node
    raise AssertionError(f"no worker node in {device!r}")


@pytest.mark.slow
@cluster_slow
def test_a_job_whose_node_dies_resumes_elsewhere_from_its_checkpoint(ray_daemons, cluster: Cluster) -> None:
    d = ray_daemons(step_s=0.05)
    with d.client() as c:
        job = c.submit(config("a", steps=60, every=5)).id
        s = wait_step(c, job, 12, timeout=120)
        node = _node_of(cluster, s.device)
        cluster.remove_node(node, allow_graceful=False)
        try:
            end = time.monotonic() + 120
            while c.summary(job).attempts < 2 and time.monotonic() < end:
                time.sleep(0.1)
            reasons = [t.reason for t in c.show(job).transitions]
            assert any("Ray node was lost" in r and "resumes from its checkpoint" in r for r in reasons), (
                reasons
            )
            s = wait_state(c, job, "finished", timeout=180)
            assert s.step == 60 and f"({node.node_id[:8]})" not in s.device
            assert metric_steps(c, job) == list(range(1, 61))  # resumed at a checkpoint: nothing lost
            reasons = [t.reason for t in c.show(job).transitions]
            assert "started on ray (attempt 2, resuming from its last checkpoint)" in reasons, reasons
        finally:
            cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=STORE_BYTES)
            cluster.wait_for_nodes()


@pytest.mark.slow
@cluster_slow
def test_daemon_killed_mid_job_requeues_and_loses_nothing(ray_daemons, home: Path) -> None:
    d = ray_daemons(step_s=0.05)
    with d.client() as c:
        job = c.submit(config("a", steps=60, every=5)).id
        wait_step(c, job, 12, timeout=120)
    assert worker_pids(home)  # the check below would be empty otherwise
    d.kill9()  # its Ray driver dies: Ray ends its tasks, the worker dies with its task
    end = time.monotonic() + 60
    while worker_pids(home) and time.monotonic() < end:
        time.sleep(0.2)
    assert not worker_pids(home), "the Ray task outlived the daemon that started it"
    d2 = ray_daemons(step_s=0.05)
    with d2.client() as c:
        s = wait_state(c, job, "finished", timeout=180)
        assert s.step == 60
        reasons = [t.reason for t in c.show(job).transitions]
        assert any("daemon restarted after an unclean stop" in r for r in reasons), reasons
        assert metric_steps(c, job) == list(range(1, 61))

"""Executors: how a job's worker gets started, watched and signalled. The scheduler (which job runs
next, on which slot) hands a `WorkerSpec` to an executor and gets a `Handle` back; the worker itself
(daemon/worker.py) is the same program whoever starts it.

- `local` (daemon/executors/local.py): a child process on this machine, one per device slot.
- `ray` (daemon/executors/ray.py): one Ray task per job on a Ray cluster, its messages relayed to
  the daemon over CURVE-authenticated TCP (daemon/executors/relay.py). Needs `pip install 'dallm[ray]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dallm.daemon.executors.spec import Executor


def make_executor(name: str, options: dict[str, Any], folders: list[Path]) -> Executor:
    """`--executor NAME` with its options; `folders`: where job folders may be (checked as shared)."""
    if name == "local":
        from dallm.daemon.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from dallm.daemon.executors.ray import RayExecutor

        return RayExecutor(options.get("address") or "auto", folders, options.get("gpus_per_job"),
                           options.get("worker_host"), bool(options.get("trust_cluster")))  # fmt: skip
    raise ValueError(f"--executor {name!r}: use local or ray")

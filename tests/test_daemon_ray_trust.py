"""Issue 25: `--executor ray` refuses a cluster without authentication unless --trust-cluster, and
says what that trust means; a worker's per-attempt secret is never a task argument. Without a
cluster: Ray's side is a stand-in (tests/test_daemon_ray.py runs a token-authenticated cluster)."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from dallm.daemon.executors import ray_trust  # noqa: E402
from dallm.daemon.executors.ray import RayExecutor  # noqa: E402
from dallm.daemon.executors.spec import WorkerSpec  # noqa: E402


class FakeRay:
    """What check_trust and RayExecutor.start use of Ray: nodes, a probe per node, get."""

    def __init__(self, modes: dict[str, bool]) -> None:
        self.modes = modes
        self.exceptions = SimpleNamespace(GetTimeoutError=TimeoutError)
        self.calls: list[tuple[Any, ...]] = []

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": "ab" * 28, "NodeManagerAddress": addr, "Alive": True} for addr in self.modes]

    def remote(self, **kw: Any):  # noqa: ANN201
        modes, calls = iter(self.modes.values()), self.calls

        class Remote:
            def __init__(self, fn: Any) -> None:
                self.fn = fn

            def options(self, **kw: Any) -> Remote:
                return self

            def remote(self, *args: Any) -> Any:
                calls.append(args)
                return next(modes, None)

        return Remote

    def get(self, refs: list[Any], timeout: float | None = None) -> list[Any]:
        return refs

    def get_runtime_context(self) -> Any:
        raise RuntimeError("a client connection: no local session")


def test_an_unauthenticated_cluster_is_refused_without_trust_cluster() -> None:
    ray = FakeRay({"10.0.0.1": True, "10.0.0.2": False})
    with pytest.raises(RuntimeError) as err:
        ray_trust.check_trust(ray, trust=False)
    msg = str(err.value)
    assert "10.0.0.2 run without token authentication" in msg and "RAY_AUTH_MODE=token" in msg
    assert "--trust-cluster" in msg and "\n" not in msg
    line = ray_trust.check_trust(FakeRay({"10.0.0.2": False}), trust=True)
    assert "TRUSTED by --trust-cluster" in line and "rights of this daemon's user" in line
    assert "token authentication on every node" in ray_trust.check_trust(FakeRay({"a": True}), trust=False)


def test_ray_folders_open_to_every_user_count_as_open() -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path lies in a 0700 folder
    try:
        shared = base / "ray"
        shared.mkdir()
        shared.chmod(0o777)  # what Ray makes of its temp dir
        base.chmod(0o755)
        assert "writable by every user" in (ray_trust.session_problem([shared]) or "")
        base.chmod(0o700)  # inside a folder others cannot enter: closed
        assert ray_trust.session_problem([shared]) is None
        shared.chmod(0o1777)
        base.chmod(0o755)
        assert ray_trust.session_problem([shared]) is None  # sticky, as /tmp
    finally:
        shutil.rmtree(base)


def test_the_workers_secret_is_no_task_argument(tmp_path: Path) -> None:
    ex = RayExecutor.__new__(RayExecutor)
    ray = FakeRay({})
    ex.ray, ex.gpus, ex.secrets = ray, 0.0, {}
    ex.remote = ray.remote()(None)
    secret = b"s" * 40
    ex.relay = SimpleNamespace(
        add=lambda identity: (b"p" * 40, secret), public=b"d" * 40, remove=lambda i: None
    )
    out = tmp_path / "job"
    out.mkdir(mode=0o700)
    (out / "job-config.json").write_text("{}")
    spec = WorkerSpec(job=1, attempt=1, device="ray", endpoint="tcp://x:1", config=out / "job-config.json",
                      out=out, resume=None, log=out / "worker.log", runner=None, slot_cores=None)  # fmt: skip
    ex.start(spec)
    assert secret.decode() not in repr(ray.calls) and ray.calls  # the task's arguments
    key = out / ray_trust.SECRET_FILE
    assert key.read_bytes() == secret and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ray_trust.read_secret(out) == secret.decode()  # what the task reads on its node
    ex.release(b"1.1")
    assert not key.exists()

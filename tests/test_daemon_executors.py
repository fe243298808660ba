"""The executor choice at `dallm-daemon start`: options that need Ray are refused without it, in
one line, before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dallm.daemon.cli import main
from dallm.daemon.executors import make_executor
from dallm.daemon.executors.local import LocalExecutor


def test_ray_options_need_the_ray_executor(tmp_path: Path, capsys) -> None:
    assert main(["start", "--foreground", "--home", str(tmp_path / "h"), "--gpus-per-job", "0.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "dallm-daemon start: --ray-address, --gpus-per-job, --worker-host and --trust-cluster go with --executor ray"
    )
    assert main(["start", "--foreground", "--home", str(tmp_path / "h"), "--trust-cluster"]) == 1


def test_the_ray_executor_without_ray_says_how_to_get_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r"needs Ray: pip install 'dallm\[ray\]'"):
        make_executor("ray", {}, [])
    with pytest.raises(ValueError, match="--executor 'k8s'"):
        make_executor("k8s", {}, [])
    assert isinstance(make_executor("local", {}, []), LocalExecutor)

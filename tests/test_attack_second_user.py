"""Issues 13 and 25: the second-user attacks (bench/attack_second_user.py) do no harm. They need root (the
attacker is `nobody`, via setpriv): CI runs as root; elsewhere the test is skipped and says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "attack_second_user.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the attacker is a second user, `nobody`")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to become `nobody`")
def test_a_second_local_user_cannot_harm_the_daemon() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DALLM_CONNECT", "DALLM_HOME")}
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(line.split()[1] for line in lines if line.startswith("PASS")) == [
        "flood:", "home:", "ipc:", "limits:", "links:", "pickle:", "spill:", "squat:", "tcp:",
    ]  # fmt: skip

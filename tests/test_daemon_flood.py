# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 25: a flood of unauthenticated TCP connections (as a second user where the tests run as
root) neither crashes the daemon nor keeps it from answering its owner and the peers already in.
The daemon runs with a low descriptor limit (`prlimit`), so the flood fills it in a second."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import DaemonProc, home  # noqa: F401
from test_daemon_security import free_port

from dallm.client.client import DaemonClient
from dallm.daemon.gate import HANDSHAKE_S, budget, ensure_descriptors

FLOOD = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for port in map(int, sys.argv[2:]):
    for _ in range(int(sys.argv[1])):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
print(len(held), flush=True)
sys.stdin.read()  # held open until the test closes our stdin
"""
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def flooder(ports: list[int], per_port: int) -> subprocess.Popen:
    """Connections that never handshake, held open: as `nobody` when we may become it."""
    who = NOBODY if os.geteuid() == 0 and shutil.which("setpriv") else []
    cmd = [*who, sys.executable, "-c", FLOOD, str(per_port), *map(str, ports)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert p.stdout is not None
    assert int(p.stdout.readline()) == per_port * len(ports)
    return p


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_a_connection_flood_does_not_crash_the_daemon(home: Path) -> None:
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    d = DaemonProc(home, "--bind", endpoint)
    limit = budget(1, 2)  # the least this daemon starts with
    d.prefix = ["prlimit", f"--nofile={limit}:{limit}"]
    d.start()
    try:
        with DaemonClient(endpoint, home=home, timeout=5) as peer, d.client(timeout=5) as owner:
            assert peer.ping().pid == d.proc.pid  # an authenticated peer, in before the flood
            flood = flooder([port, port + 1], 1500)
            try:
                time.sleep(1.0)
                for _ in range(3):
                    assert d.proc.poll() is None, d.log_text()[-2000:]
                    assert owner.jobs() == []  # the owner's `dallm ls` over IPC
                    assert DaemonClient(home=home, timeout=5).ping().pid == d.proc.pid  # a new IPC client
                    assert peer.ping().pid == d.proc.pid
                    time.sleep(0.5)
            finally:
                assert flood.stdin is not None
                flood.stdin.close()
                flood.wait(10)
        time.sleep(HANDSHAKE_S + 0.5)  # the flood's pending slots have timed out
        assert _late_ping(endpoint, home) == d.proc.pid  # a new peer gets in again
        assert "over its caps cut" in d.log_text()
    finally:
        d.cleanup()


def _late_ping(endpoint: str, home: Path) -> int:
    """A new TCP client's ping; on a loaded machine the last of the flood's connections may hold the
    pending slots a few seconds more (ZMQ's client retries by itself): up to 4 tries."""
    from dallm.client.client import DaemonUnavailable

    for _ in range(3):
        try:
            with DaemonClient(endpoint, home=home, timeout=5) as late:
                return late.ping().pid
        except DaemonUnavailable:
            time.sleep(1.0)
    with DaemonClient(endpoint, home=home, timeout=5) as late:
        return late.ping().pid


def test_descriptor_limit_too_low_is_refused_in_one_line() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with pytest.raises(RuntimeError, match=r"descriptor limit \(\d+\) is below the \d+ this daemon needs"):
        ensure_descriptors(hard + 1 if hard != resource.RLIM_INFINITY else 2**62)
    assert ensure_descriptors(min(soft, 64)) == soft  # enough already: left as it is


def test_subscribers_are_capped_and_the_daemon_keeps_serving(home: Path) -> None:
    """Issue 25: 300 subscribers that never read took the daemon's RSS from 80 to 451 MB."""
    import zmq
    from daemon_helpers import config

    from dallm.client.home import DaemonPaths
    from dallm.daemon.gate import MAX_SUBSCRIBERS

    d = DaemonProc(home).start()
    ctx = zmq.Context()
    subs = []
    try:
        for _ in range(MAX_SUBSCRIBERS + 36):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(DaemonPaths(home).endpoint("events"))
            subs.append(s)
        time.sleep(1.0)  # connected (or cut)
        with d.client() as c:
            c.submit(config("x", steps=3))
            time.sleep(1.5)
            heard = sum(1 for s in subs if s.poll(100, zmq.POLLIN))
            assert 0 < heard <= MAX_SUBSCRIBERS
            assert c.ping().pid == d.proc.pid
        for s in subs:
            s.close(0)
        subs.clear()
        time.sleep(0.5)
        with d.client() as c, c.subscribe(since=None) as sub:  # room again once they left
            time.sleep(0.3)
            c.submit(config("y", steps=3))
            assert sub.get(timeout=10) is not None
    finally:
        for s in subs:
            s.close(0)
        ctx.term()
        d.cleanup()

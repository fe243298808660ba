# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 13: every TCP bind is authenticated (loopback too), revoked keys stop working without a
restart, and the socket folder is ours and private or nobody uses it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from daemon_helpers import config, daemons, home  # noqa: F401
from test_daemon_security import free_port

from dallm.client.client import DaemonClient, DaemonError, DaemonUnavailable
from dallm.client.home import DaemonPaths
from dallm.client.transport import create_client_keys
from dallm.protocol import PingRequest, ShutdownRequest, SubmitRequest, encode_request


def raw_requests_answered(endpoint: str, frames: list[bytes], curve: tuple[Path, Path] | None = None) -> int:
    """Requests sent over a bare DEALER (what an attacker would use); how many got any answer."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        from dallm.client.transport import make_curve_client

        make_curve_client(s, *curve)
    s.connect(endpoint)
    answered = 0
    try:
        for frame in frames:
            try:
                s.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                continue  # no connection completed its handshake: nothing can even be sent
            if s.poll(1500, zmq.POLLIN):
                s.recv_multipart()
                answered += 1
    finally:
        s.close(0)
    return answered


def test_loopback_tcp_refuses_clients_without_a_key(daemons, home: Path) -> None:
    port = free_port()
    d = daemons("--bind", f"tcp://127.0.0.1:{port}")
    endpoint = f"tcp://127.0.0.1:{port}"
    requests = [
        encode_request(1, PingRequest()),
        encode_request(2, SubmitRequest(config=config("x"), source="attack")),
        encode_request(3, ShutdownRequest()),
    ]
    assert raw_requests_answered(endpoint, requests) == 0  # plaintext: the handshake never completes
    stranger = home.parent / "stranger"
    stranger.mkdir()
    _, bad = zmq.auth.create_certificates(stranger, "mallory")
    server = DaemonPaths(home).keys / "server.key"
    assert raw_requests_answered(endpoint, requests, (server, Path(bad))) == 0
    # Our library refuses at once when it has no keys (another user cannot read the home's).
    with pytest.raises(DaemonUnavailable, match="needs CURVE keys"):
        DaemonClient(endpoint, home=home.parent / "elsewhere")
    assert d.proc is not None and d.proc.poll() is None  # still running: the shutdown was not heard
    with d.client() as c:
        assert c.jobs() == []  # and the submit queued nothing
    with DaemonClient(endpoint, home=home, timeout=5) as c:  # the daemon's own user: the local key
        assert c.ping().pid == d.proc.pid
    assert raw_requests_answered(endpoint, requests[:1], (server, DaemonPaths(home).keys / "clients" / "local.key_secret")) == 1  # fmt: skip


def test_tcp_start_refuses_when_others_could_add_keys(home: Path) -> None:
    keys = DaemonPaths(home).keys / "authorized"
    keys.mkdir(parents=True)
    os.chmod(keys, 0o777)
    res = subprocess.run(
        [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(home),
         "--bind", f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "authorized keys folder" in res.stderr and "0777" in res.stderr


def test_revoked_key_stops_working_without_a_restart(daemons, home: Path) -> None:
    keys = DaemonPaths(home).keys
    home.mkdir(parents=True)
    _, alice = create_client_keys(keys, "alice")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    daemons("--bind", endpoint)
    server = keys / "server.key"
    with DaemonClient(endpoint, server_key=server, client_key=alice, timeout=5) as c:
        assert c.ping()
        (keys / "authorized" / "alice.key").unlink()
        time.sleep(1.5)  # the daemon re-reads authorized/ every second
        with pytest.raises(DaemonError) as err:
            c.ping()  # the connection opened before the revocation
        assert err.value.code == "unauthorized"
    with (
        DaemonClient(endpoint, server_key=server, client_key=alice, timeout=1.5) as c,
        pytest.raises(DaemonUnavailable),
    ):
        c.ping()  # a new connection: the handshake is refused


def _subscriber(endpoint: str, server: Path, client: Path) -> zmq.Socket:
    from dallm.client.transport import event_endpoint, make_curve_client

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    make_curve_client(sub, server, client)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(event_endpoint(endpoint))
    return sub


def _hears(sub: zmq.Socket, c: DaemonClient, job: int, seconds: float) -> bool:
    """Whether `sub` gets any event while the job's priority is set (each change publishes its row)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.set_priority(job, 1)
        if sub.poll(200, zmq.POLLIN):
            return True
    return False


def test_revoked_key_loses_its_event_subscription(daemons, home: Path) -> None:
    keys = DaemonPaths(home).keys
    home.mkdir(parents=True)
    _, alice = create_client_keys(keys, "alice")
    _, bob = create_client_keys(keys, "bob")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    d = daemons("--bind", endpoint)
    server = keys / "server.key"
    subs = {name: _subscriber(endpoint, server, key) for name, key in (("alice", alice), ("bob", bob))}
    try:
        with d.client() as c:
            job = c.submit(config("q", steps=2, every=2)).id
            assert all(_hears(sub, c, job, 10) for sub in subs.values())  # both subscribed
            (keys / "authorized" / "alice.key").unlink()
            time.sleep(1.5)  # the daemon re-reads authorized/ every second
            for sub in subs.values():
                while sub.poll(0, zmq.POLLIN):
                    sub.recv_multipart()  # what was published before the revocation
            assert _hears(subs["bob"], c, job, 10)  # an authorized subscriber reconnects by itself
            assert not _hears(subs["alice"], c, job, 3)  # the revoked one hears nothing more
        assert "a client key was revoked" in d.log_text()
    finally:
        for sub in subs.values():
            sub.close(0)


def long_home(root: Path) -> Path:
    """A home whose run folder is too long for IPC paths: the sockets go to /tmp/dallm-<uid>-<hash>."""
    h = root / ("x" * 90) / "h"
    assert DaemonPaths(h).socket_dir != DaemonPaths(h).state_dir
    return h


def start_foreground(h: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(h)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_squatted_socket_folder_refused_by_daemon_and_client(home: Path) -> None:
    h = long_home(home.parent)
    sock_dir = DaemonPaths(h).socket_dir
    shutil.rmtree(sock_dir, ignore_errors=True)
    try:
        sock_dir.mkdir(mode=0o777)
        os.chmod(sock_dir, 0o777)
        if os.geteuid() == 0:
            os.chown(sock_dir, 65534, 65534)  # `nobody` squatted it
        res = start_foreground(h)
        assert res.returncode == 1 and res.stderr.count("\n") == 1
        assert f"socket folder {sock_dir}" in res.stderr and "refusing" in res.stderr
        assert not (sock_dir / "control.ipc").exists()
        # The client refuses a squatted folder too, before it connects.
        with pytest.raises(DaemonError) as err:
            DaemonClient(f"ipc://{sock_dir}/control.ipc")
        assert err.value.code == "unsafe"
        # A symlink in place of the folder is refused as well.
        shutil.rmtree(sock_dir)
        target = home.parent / "target"
        target.mkdir(mode=0o700)
        sock_dir.symlink_to(target)
        res = start_foreground(h)
        assert res.returncode == 1 and "is a symlink" in res.stderr
    finally:
        if sock_dir.is_symlink():
            sock_dir.unlink()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_client_refuses_a_folder_opened_to_others_after_start(daemons, home: Path) -> None:
    d = daemons()
    run = DaemonPaths(home).state_dir
    os.chmod(run, 0o777)
    try:
        with pytest.raises(DaemonError) as err:
            d.client()
        assert err.value.code == "unsafe" and "0777" in str(err.value)
    finally:
        os.chmod(run, 0o700)
    with d.client() as c:
        assert c.ping()

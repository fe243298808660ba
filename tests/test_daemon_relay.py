"""The link of remote workers (daemon/executors/relay.py): CURVE keys made per job attempt, a key
speaks only for its own job, a removed key is refused, and commands find their way back."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dallm.daemon.executors.relay import Relay


@pytest.fixture
def link() -> Iterator[tuple[zmq.Socket, Relay]]:
    folder = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    ctx = zmq.Context()
    daemon = ctx.socket(zmq.ROUTER)  # stands for the daemon's IPC worker socket
    daemon.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{folder}/w.ipc"
    daemon.bind(endpoint)
    relay = Relay("tcp://127.0.0.1", endpoint)
    yield daemon, relay
    relay.close()
    daemon.close()
    ctx.term()


def worker(relay: Relay, identity: bytes, keys: tuple[bytes, bytes]) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey = relay.public
    s.curve_publickey, s.curve_secretkey = keys
    s.connect(relay.endpoint)
    return s


def received(sock: zmq.Socket, timeout_ms: int) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(timeout_ms) else None


def test_a_job_key_speaks_for_its_job_only(link: tuple[zmq.Socket, Relay]) -> None:
    daemon, relay = link
    assert relay.endpoint.startswith("tcp://127.0.0.1:")
    a = worker(relay, b"1.1", relay.add(b"1.1"))
    a.send_multipart([b"m", b"hello from 1"])
    assert received(daemon, 10_000) == [b"1.1", b"m", b"hello from 1"]
    daemon.send_multipart([b"1.1", b"stop"])  # a command finds the worker through the relay
    assert received(a, 10_000) == [b"stop"]

    relay.add(b"2.1")
    b_keys = relay.add(b"3.1")
    thief = worker(relay, b"2.1", b_keys)  # job 3's key claiming to be job 2
    thief.send_multipart([b"m", b"forged"])
    stranger = worker(relay, b"2.1", zmq.curve_keypair())  # a key nobody was given
    stranger.send_multipart([b"m", b"forged"])
    assert received(daemon, 1_500) is None

    keys = relay.add(b"4.1")
    relay.remove(b"4.1")  # the job ended: its key no longer connects
    late = worker(relay, b"4.1", keys)
    late.send_multipart([b"m", b"late"])
    assert received(daemon, 1_500) is None
    for s in (a, thief, stranger, late):
        s.close()


def test_a_connection_flood_on_the_worker_port_is_capped(link: tuple[zmq.Socket, Relay]) -> None:
    """Issue 25: the relay's TCP port is open to the network; connections that never handshake are
    cut beyond the caps (daemon/gate.py), so they cannot fill the daemon's descriptors."""
    import socket
    import time

    from dallm.daemon.gate import MAX_PENDING

    _, relay = link
    port = int(relay.endpoint.rsplit(":", 1)[1])
    held = []
    for _ in range(300):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    time.sleep(1.0)
    (gauge,) = relay.gate.gauges.values()
    assert len(gauge.live) <= MAX_PENDING and gauge.refused >= 100  # (the rest wait in the backlog)
    for s in held:
        s.close()

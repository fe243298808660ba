"""The daemon's sockets: the control ROUTER and event PUB on the home's IPC folder, the worker ROUTER,
and every TCP bind as CURVE (a loopback port is open to every local user)."""

from __future__ import annotations

import contextlib
import os

import zmq

from dallm.client.home import DaemonPaths
from dallm.client.transport import (
    KeyWatch,
    check_key_folders,
    ensure_local_client_key,
    event_endpoint,
    is_loopback,
    make_curve_server,
    remote_keys,
    require_curve,
    server_keys,
    start_authenticator,
)
from dallm.daemon.limits import CONTROL_RCVHWM, CONTROL_SNDHWM
from dallm.protocol import MAX_CONTROL_BYTES, MAX_WORKER_BYTES

PUB_HWM = 10_000  # per subscriber; beyond it PUB drops (training never waits on a subscriber)


class Sockets:
    """Binds the daemon's sockets; a part of Daemon (the attributes below are set by its __init__)."""

    paths: DaemonPaths
    ctx: zmq.Context
    auth: object | None
    keywatch: KeyWatch | None
    curve_control: set[zmq.Socket]
    control: list[zmq.Socket]
    control_endpoints: list[str]
    pubs: list[zmq.Socket]
    event_endpoints: list[str]
    workers: zmq.Socket

    def _control_socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, CONTROL_SNDHWM)  # see daemon/limits.py for the memory bound
        s.setsockopt(zmq.RCVHWM, CONTROL_RCVHWM)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full client queue raises Again instead of dropping silently
        return s

    def pub_socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, PUB_HWM)
        s.setsockopt(zmq.LINGER, 0)
        return s

    def _bind_ipc(self) -> None:
        ctl, pub = self._control_socket(), self.pub_socket()
        ctl.bind(self.paths.endpoint("control"))
        pub.bind(self.paths.endpoint("events"))
        self.control.append(ctl)
        self.pubs.append(pub)
        self.control_endpoints = [self.paths.endpoint("control")]
        self.event_endpoints.append(self.paths.endpoint("events"))
        self.workers = self.ctx.socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_BYTES)
        self.workers.setsockopt(zmq.RCVHWM, 100_000)
        self.workers.setsockopt(zmq.LINGER, 0)
        self.workers.bind(self.paths.endpoint("workers"))
        for name in ("control", "events", "workers"):
            with contextlib.suppress(OSError):
                os.chmod(self.paths.socket_dir / f"{name}.ipc", 0o600)

    def _bind_tcp(self, endpoint: str) -> None:
        """Every TCP bind is CURVE (a loopback port is open to every local user): the daemon's own
        user connects with the home's local key; others need a key in authorized/."""
        event_endpoint(endpoint)  # a malformed endpoint is refused before anything is set up
        require_curve()
        keys = self.paths.keys
        check_key_folders(keys)
        ensure_local_client_key(keys)
        if not is_loopback(endpoint) and not remote_keys(keys):
            raise RuntimeError(
                f"a TCP bind beyond loopback needs CURVE client keys: none in {keys / 'authorized'} "
                "(create one with `dallm-daemon keys --client NAME`)"
            )
        if self.auth is None:
            self.auth = start_authenticator(self.ctx, keys)
            self.keywatch = KeyWatch(self.auth, keys)
        ctl, pub = self._control_socket(), self.pub_socket()
        public, secret = server_keys(keys)
        make_curve_server(ctl, public, secret)
        make_curve_server(pub, public, secret)
        self.curve_control.add(ctl)
        ctl.bind(endpoint)
        pub.bind(event_endpoint(endpoint))
        self.control.append(ctl)
        self.pubs.append(pub)
        self.control_endpoints.append(endpoint)
        self.event_endpoints.append(event_endpoint(endpoint))

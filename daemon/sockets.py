"""The daemon's sockets: the control ROUTER and event PUB on the home's IPC folder, the worker ROUTER,
and every TCP bind as CURVE (a loopback port is open to every local user)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

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
from dallm.daemon.gate import FD_RESERVE, MAX_SUBSCRIBERS, MAX_TOTAL, Gate, budget, claim, release
from dallm.daemon.limits import CONTROL_RCVHWM, CONTROL_SNDHWM
from dallm.protocol import MAX_CONTROL_BYTES, MAX_WORKER_BYTES

PUB_HWM = 2000  # per subscriber, with MAX_SUBSCRIBERS (daemon/gate.py) the memory bound; beyond it PUB
# drops (training never waits on a subscriber; a client fills the gap from the history)
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Sockets:
    """Owns the ZMQ context and every socket: binds them, publishes on the event sockets, checks a
    CURVE request's key, replaces an event socket (daemon/revoke.py) and closes them all."""

    def __init__(self, paths: DaemonPaths, bind: list[str]) -> None:
        self.paths = paths
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.keywatch: KeyWatch | None = None
        self.curve_control: set[zmq.Socket] = set()  # TCP control sockets: requests carry a User-Id
        self.control: list[zmq.Socket] = []  # [0]: the IPC socket (the daemon's own user)
        self.control_endpoints: list[str] = []
        self.pubs: list[zmq.Socket] = []
        self.event_endpoints: list[str] = []
        self._claim = budget(len(bind), 1 + len(bind)) - FD_RESERVE
        claim(self._claim)  # descriptors for every cap of daemon/gate.py
        self.gate = Gate()  # caps the connections of every TCP socket and event socket
        self._bind_ipc()
        for endpoint in bind:
            self._bind_tcp(endpoint)
        self.gate.start()

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
        self.gate.watch(pub, self.paths.endpoint("events"), MAX_SUBSCRIBERS, subscribers=True)
        pub.bind(self.paths.endpoint("events"))
        self.control.append(ctl)
        self.pubs.append(pub)
        self.control_endpoints.append(self.paths.endpoint("control"))
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
        self.gate.watch(ctl, endpoint, MAX_TOTAL)
        self.gate.watch(pub, event_endpoint(endpoint), MAX_SUBSCRIBERS, subscribers=True)
        ctl.bind(endpoint)
        pub.bind(event_endpoint(endpoint))
        self.control.append(ctl)
        self.pubs.append(pub)
        self.control_endpoints.append(endpoint)
        self.event_endpoints.append(event_endpoint(endpoint))

    def publish(self, batch: list[list[bytes]]) -> None:
        more, last = _MORE, _LAST
        for pub in self.pubs:
            send = pub.send
            for frames in batch:  # a PUB never blocks: it drops at a subscriber's HWM
                for frame in frames[:-1]:
                    send(frame, more)
                send(frames[-1], last)

    def is_local(self, sock: zmq.Socket) -> bool:
        """The IPC control socket: the daemon's own user."""
        return sock is self.control[0]

    def authorized(self, sock: zmq.Socket, frame: zmq.Frame) -> bool:
        """A CURVE connection outlives its key's removal from authorized/: check each request."""
        if sock not in self.curve_control:
            return True
        if self.keywatch is None:
            return False
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return False
        return self.keywatch.allowed(user)

    def reload_keys(self) -> None:
        """SIGHUP: re-read authorized/ at the next loop turn."""
        if self.keywatch is not None:
            self.keywatch.request()

    def replace_publisher(self, endpoint: str, bind: Callable[[zmq.Socket, str], None]) -> None:
        """Close the CURVE event socket on `endpoint` and put a new one there, bound by `bind`: a
        PUB cannot drop one subscriber, so every one of them reconnects (with its key)."""
        i = self.event_endpoints.index(endpoint)
        self.gate.stop()
        self.gate.unwatch(self.pubs[i])
        self.pubs[i].close(0)
        pub = self.pub_socket()
        make_curve_server(pub, *server_keys(self.paths.keys))
        self.gate.watch(pub, endpoint, MAX_SUBSCRIBERS, subscribers=True)
        bind(pub, endpoint)
        self.pubs[i] = pub
        self.gate.start()

    def close(self) -> None:
        self.gate.close()
        release(self._claim)
        for s in [*self.control, *self.pubs, self.workers]:
            s.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

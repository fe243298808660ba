"""The daemon's end of the links of workers on other machines: a CURVE-authenticated TCP ROUTER,
relayed to the daemon's own (IPC) worker socket, so the daemon sees a remote worker exactly as a
local one.

Each job attempt gets its own key pair (`add`); the ZAP handler admits only keys of jobs running
now, and every message must come from the key of the identity ("job.attempt") it claims, so one
job's key cannot speak for another job. `remove` revokes the key when the job has ended. The
daemon's key pair is made fresh at each start; its secret never touches the disk (a worker's
secret goes through its job folder, 0600: daemon/executors/ray_trust.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator

from dallm.daemon.gate import MAX_TOTAL, Gate, claim, local_address, release
from dallm.protocol import MAX_WORKER_BYTES

log = logging.getLogger("dallm.daemon")
DOMAIN = "dallm-workers"


class Relay:
    def __init__(self, bind: str, daemon_endpoint: str) -> None:
        """bind: tcp://HOST or tcp://HOST:PORT (no port: a free one)."""
        if not zmq.has("curve"):
            raise RuntimeError("remote workers need CURVE, which this libzmq lacks")
        self.ctx = zmq.Context()  # its own ZAP handler: the control sockets' one reads authorized/
        self.public, self.secret = zmq.curve_keypair()
        self.keys: dict[bytes, bytes] = {}  # identity -> its public key (Z85)
        self.allowed: set[bytes] = set()
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(DOMAIN, self)
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.curve_server = True
        self.front.curve_publickey, self.front.curve_secretkey = self.public, self.secret
        self.front.zap_domain = DOMAIN.encode()
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_BYTES)
        self.front.setsockopt(zmq.RCVHWM, 100_000)
        self.front.setsockopt(zmq.LINGER, 0)
        # A flood of connections on this port must not fill the daemon's descriptors (daemon/gate.py).
        claim(MAX_TOTAL)
        self.gate = Gate()
        gauge = self.gate.watch(self.front, "tcp://*:0", MAX_TOTAL)
        host, _, port = bind.removeprefix("tcp://").rpartition(":")
        if host and port.isdigit():
            self.front.bind(bind)
            self.endpoint = bind
        else:
            host = bind.removeprefix("tcp://")
            self.endpoint = f"tcp://{host}:{self.front.bind_to_random_port(f'tcp://{host}')}"
        gauge.endpoint, gauge.local = self.endpoint, local_address(self.endpoint)
        self.gate.start()
        self.daemon_endpoint = daemon_endpoint
        self.ops: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dallm-relay", daemon=True)
        self.thread.start()

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP handler's question (its thread): is this a key of a running job?"""
        return key in self.allowed

    def add(self, identity: bytes) -> tuple[bytes, bytes]:
        """A key pair for the worker `identity`, admitted from now on: (public, secret), Z85."""
        public, secret = zmq.curve_keypair()
        self.keys[identity] = public
        self.allowed.add(public)
        self.ops.put(("add", identity))
        return public, secret

    def remove(self, identity: bytes) -> None:
        public = self.keys.pop(identity, None)
        self.allowed.discard(public or b"")
        self.ops.put(("remove", identity))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.gate.close()
        release(MAX_TOTAL)
        self.auth.stop()
        self.ctx.destroy(linger=0)

    # --- the relay thread: the only user of its sockets ---------------------------------------

    def _apply(
        self, poller: zmq.Poller, backs: dict[bytes, zmq.Socket], idents: dict[zmq.Socket, bytes]
    ) -> None:
        while True:
            try:
                op, identity = self.ops.get_nowait()
            except queue.Empty:
                return
            if op == "add" and identity not in backs:
                back = self.ctx.socket(zmq.DEALER)
                back.setsockopt(zmq.IDENTITY, identity)
                back.setsockopt(zmq.SNDHWM, 100_000)
                back.setsockopt(zmq.LINGER, 5_000)
                back.connect(self.daemon_endpoint)
                backs[identity], idents[back] = back, identity
                poller.register(back, zmq.POLLIN)
            elif op == "remove" and identity in backs:
                back = backs.pop(identity)
                idents.pop(back, None)
                poller.unregister(back)
                back.close()

    def _run(self) -> None:
        backs: dict[bytes, zmq.Socket] = {}
        idents: dict[zmq.Socket, bytes] = {}
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        while not self.stopping.is_set():
            self._apply(poller, backs, idents)
            for sock, _ in poller.poll(100):
                if sock is self.front:
                    self._up(poller, backs, idents)
                else:
                    self._down(sock, idents[sock])
        for back in backs.values():
            back.close(0)
        self.front.close(0)

    def _up(
        self, poller: zmq.Poller, backs: dict[bytes, zmq.Socket], idents: dict[zmq.Socket, bytes]
    ) -> None:
        for _ in range(10_000):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            if identity not in backs:
                self._apply(poller, backs, idents)  # added an instant ago
            back = backs.get(identity)
            user = frames[1].get("User-Id") if len(frames) > 1 else None
            if back is None or user is None or user.encode() != self.keys.get(identity):
                log.warning("worker link: dropped a message of %r from another job's key", identity)
                continue
            try:
                back.send_multipart([f.bytes for f in frames[1:]], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("worker link: the daemon's queue for %r is full; a message was dropped", identity)

    def _down(self, back: zmq.Socket, identity: bytes) -> None:
        for _ in range(1_000):
            try:
                frames = back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            with contextlib.suppress(zmq.ZMQError):  # the worker is gone: its executor says so
                self.front.send_multipart([identity, *frames], zmq.NOBLOCK)

"""Connection caps on the daemon's listening sockets (issue 25): a flood of connections that never
finish the CURVE handshake must not fill the daemon's descriptors (libzmq aborts on EMFILE in places:
the IPC listener, a new socket's signaler), so the owner's IPC clients and the peers already in keep
being served while it runs.

ZMQ accepts connections in its I/O thread and has no per-socket cap, but its socket monitor reports
each accepted connection with its descriptor. A thread of ours watches every TCP socket and the
event sockets; a connection beyond a cap is shut down at once (`shutdown(2)` on the descriptor: ZMQ
sees the end and closes it). Caps, per socket:
- total: MAX_TOTAL live connections (MAX_SUBSCRIBERS on an event socket);
- pending: MAX_PENDING connections accepted in the last HANDSHAKE_S seconds. ZMQ ends a handshake
  not done within HANDSHAKE_S (ZMQ_HANDSHAKE_IVL), so a connection older than that is authenticated.
A flooding attacker holds at most MAX_PENDING descriptors of each socket, for HANDSHAKE_S at a time.

Descriptors: each owner of watched sockets `claim`s what their caps need; the soft limit is raised
toward the hard one to cover every claim, and the start is refused (one line) when even the hard
limit leaves no room for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import zmq

log = logging.getLogger("dallm.daemon")

HANDSHAKE_S = 5.0
MAX_PENDING = 32  # per socket: connections accepted within HANDSHAKE_S (not yet known to be a peer)
MAX_TOTAL = 128  # per TCP socket
MAX_SUBSCRIBERS = 64  # per event socket (each costs up to its HWM of queued events)
FD_RESERVE = 256  # the store, job folders, workers, the owner's IPC clients
_EVENTS = int(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)


def budget(tcp_sockets: int, event_sockets: int) -> int:
    """Descriptors the daemon needs with every cap reached (FD_RESERVE included)."""
    return FD_RESERVE + tcp_sockets * MAX_TOTAL + event_sockets * MAX_SUBSCRIBERS


_claimed = [FD_RESERVE]  # descriptors the sockets of this process may hold with every cap reached


def claim(n: int) -> None:
    """`n` more descriptors for the caps of new sockets: the soft limit raised to cover all claims
    (ensure_descriptors); RuntimeError when the hard limit cannot. `release` when they close."""
    ensure_descriptors(_claimed[0] + n)
    _claimed[0] += n


def release(n: int) -> None:
    _claimed[0] -= n


def ensure_descriptors(need: int) -> int:
    """Raise the soft descriptor limit to at least `need` (up to the hard limit); RuntimeError
    (one line) when the hard limit is lower. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RuntimeError(
            f"the descriptor limit ({hard}) is below the {need} this daemon needs for its connection "
            f"caps; raise it (`ulimit -n {need}`) or bind fewer TCP endpoints"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


def _local_name(fd: int) -> object:
    """The local address of socket `fd` (the port of a TCP socket, the path of an IPC one), or None."""
    try:
        s = socket.socket(fileno=fd)  # wraps without a dup: detached again below
    except OSError:
        return None
    try:
        name = s.getsockname()
        return name[1] if isinstance(name, tuple) else name
    except OSError:
        return None
    finally:
        s.detach()


def _cut(fd: int, local: object) -> bool:
    """Shut down connection `fd` if it is still one of this listener's (same local address)."""
    if _local_name(fd) != local:
        return False
    try:
        s = socket.socket(fileno=fd)  # ZMQ may have closed it an instant ago
    except OSError:
        return False
    try:
        s.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        s.detach()


def trim_memory() -> None:
    """Give freed heap back to the system (a subscriber's queue that left stays in glibc's arenas)."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


@dataclass
class Gauge:
    """One watched socket: its live connections (descriptor -> when accepted) and its caps."""

    endpoint: str
    local: object  # the listener's local address, to check a descriptor before cutting it
    max_total: int
    max_pending: int = MAX_PENDING
    live: dict[int, float] = field(default_factory=dict)
    refused: int = 0
    subscribers: bool = False

    def admit(self, fd: int, now: float) -> bool:
        pending = sum(1 for t in self.live.values() if now - t < HANDSHAKE_S)
        if len(self.live) >= self.max_total or pending >= self.max_pending:
            return False
        self.live[fd] = now
        return True


def local_address(endpoint: str) -> object:
    """What `_local_name` reads back for a socket bound on `endpoint`."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://") :]
    return int(endpoint.rsplit(":", 1)[1])


class Gate:
    """The monitor thread: one gauge per watched socket."""

    def __init__(self) -> None:
        self.gauges: dict[zmq.Socket, Gauge] = {}
        self._watched: list[zmq.Socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trim = False

    def watch(self, sock: zmq.Socket, endpoint: str, max_total: int, subscribers: bool = False) -> Gauge:
        """Before `sock` is bound, with the thread stopped: a connection over its caps is cut as soon
        as it is accepted."""
        if endpoint.startswith("tcp://"):
            sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
        mon = sock.get_monitor_socket(_EVENTS)
        self._watched.append(sock)
        # IPC: only the daemon's user reaches it, with no handshake to wait for: no pending cap.
        pending = MAX_PENDING if endpoint.startswith("tcp://") else max_total
        gauge = Gauge(endpoint, local_address(endpoint), max_total, pending, subscribers=subscribers)
        self.gauges[mon] = gauge
        return gauge

    def unwatch(self, sock: zmq.Socket) -> None:
        """Before `sock` is closed (an event socket replaced); the thread must be stopped."""
        i = self._watched.index(sock)
        mon = list(self.gauges)[i]
        del self._watched[i], self.gauges[mon]
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        mon.close(0)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dallm-gate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        for sock, mon in zip(self._watched, list(self.gauges), strict=True):
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            mon.close(0)
        self._watched.clear()
        self.gauges.clear()

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon in self.gauges:
            poller.register(mon, zmq.POLLIN)
        swept = time.monotonic()
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(200))
            except zmq.ZMQError:
                return  # the context is ending
            for mon in ready:
                try:
                    self._drain(mon, self.gauges[mon])
                except Exception:  # the thread must live: a dead one leaves ZMQ's monitor pipe full
                    log.exception("connection gate")
            now = time.monotonic()
            if now - swept > 1.0:  # a dropped monitor event must not leave a slot taken for good
                swept = now
                for gauge in self.gauges.values():
                    gauge.live = {fd: t for fd, t in gauge.live.items() if _local_name(fd) == gauge.local}
            if self._trim and not ready:
                self._trim = False
                trim_memory()

    def _drain(self, mon: zmq.Socket, gauge: Gauge) -> None:
        while True:
            try:
                head, _ = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, fd = struct.unpack("=Hi", head[:6])
            if event == zmq.EVENT_ACCEPTED:
                if not gauge.admit(fd, time.monotonic()) and _cut(fd, gauge.local):
                    gauge.refused += 1
                    if gauge.refused in (1, 100) or gauge.refused % 10_000 == 0:
                        log.warning("%s: %d connection(s) over its caps cut", gauge.endpoint, gauge.refused)
            elif event == zmq.EVENT_DISCONNECTED:
                gauge.live.pop(fd, None)
                self._trim = self._trim or gauge.subscribers

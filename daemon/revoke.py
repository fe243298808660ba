"""A client key removed from authorized/ loses the daemon: new CURVE handshakes are refused (the
authenticator re-reads the folder), a request on a connection it opened before is answered
`unauthorized` (ControlServer.serve), and its event subscriptions are cut here: a PUB socket cannot drop one
peer, so the CURVE event sockets are closed and bound again. Every subscriber's ZMQ reconnects by
itself with its key; the removed key's handshake is refused from then on.
"""

from __future__ import annotations

import logging
import time

import zmq

from dallm.daemon.sockets import Sockets

log = logging.getLogger("dallm.daemon")


def check(sockets: Sockets, now: float) -> None:
    """Re-read authorized/ when due; reopen the TCP event sockets when a key was removed."""
    keywatch = sockets.keywatch
    if keywatch is None:
        return  # no TCP bind: no keys to watch
    before = keywatch.keys
    if not keywatch.poll(now):
        return
    log.info("authorized client keys re-read")
    if before - keywatch.keys:
        for endpoint in sockets.event_endpoints:
            if endpoint.startswith("tcp://"):
                sockets.replace_publisher(endpoint, _bind)


def _bind(pub: zmq.Socket, endpoint: str) -> None:
    for _ in range(100):  # ZMQ's I/O thread releases the old listener's port shortly
        try:
            pub.bind(endpoint)
            break
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            time.sleep(0.02)
    else:
        log.error("cannot bind %s again after a key was revoked: its subscribers are cut off", endpoint)
    log.warning("a client key was revoked: subscribers of %s reconnect with their keys", endpoint)

"""A client key removed from authorized/ loses the daemon: new CURVE handshakes are refused (the
authenticator re-reads the folder), a request on a connection it opened before is answered
`unauthorized` (Daemon.serve), and its event subscriptions are cut here: a PUB socket cannot drop one
peer, so the CURVE event sockets are closed and bound again. Every subscriber's ZMQ reconnects by
itself with its key; the removed key's handshake is refused from then on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq

from dallm.client.transport import KeyWatch, make_curve_server, server_keys

if TYPE_CHECKING:
    from dallm.daemon.server import Daemon

log = logging.getLogger("dallm.daemon")


def check(d: Daemon, keywatch: KeyWatch, now: float) -> None:
    """Re-read authorized/ when due; reopen the TCP event sockets when a key was removed."""
    before = keywatch.keys
    if not keywatch.poll(now):
        return
    log.info("authorized client keys re-read")
    if before - keywatch.keys:
        for i, endpoint in enumerate(d.event_endpoints):
            if endpoint.startswith("tcp://"):
                d.pubs[i] = _reopen(d, d.pubs[i], endpoint)


def _reopen(d: Daemon, old: zmq.Socket, endpoint: str) -> zmq.Socket:
    old.close(0)
    pub = d.pub_socket()
    make_curve_server(pub, *server_keys(d.paths.keys))
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
    return pub

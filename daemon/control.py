"""Control requests: read from each control socket, checked (size, frames, a still-authorized CURVE
key, a store that can answer), handled (daemon/handlers.py) and answered; a client that reads no
replies is left alone until it does."""

from __future__ import annotations

import logging

import zmq

from dallm.config import ConfigError
from dallm.daemon import handlers
from dallm.daemon.events import EventLog
from dallm.daemon.limits import StalledPeers
from dallm.daemon.sockets import Sockets
from dallm.daemon.spill import STORE_ERRORS
from dallm.protocol import ErrorReply, ProtocolError, decode_request, encode_reply

log = logging.getLogger("dallm.daemon")


class ControlServer:
    """Serves control requests through handlers.handle with the handlers' narrow context."""

    def __init__(self, sockets: Sockets, events: EventLog, context: handlers.Context) -> None:
        self.sockets = sockets
        self.events = events
        self.context = context
        self.stalled = StalledPeers()

    def serve(self, sock: zmq.Socket, budget: int = 500) -> None:
        for _ in range(budget):
            try:
                raw = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [f.bytes for f in raw]
            ident, rest = frames[0], frames[1:]
            if self.stalled.stalled(ident):
                continue  # it has CONTROL_SNDHWM replies unread: no work for it for now
            prefix = [ident]
            if len(rest) > 1 and rest[0] == b"":
                prefix.append(b"")
                rest = rest[1:]
            req_id = 0
            try:
                if len(rest) != 1:
                    raise ProtocolError("bad_request", f"expected one frame, got {len(rest)}")
                req_id, req = decode_request(rest[0])
                if self.events.spill:  # an answer now would be stale or fail to commit: say why instead
                    raise ProtocolError("unavailable", self.events.spill.message())
                if not self.sockets.authorized(sock, raw[-1]):
                    raise ProtocolError("unauthorized", "this client key is no longer authorized")
                reply = handlers.handle(self.context, req_id, req, local=self.sockets.is_local(sock))
            except ProtocolError as e:
                reply = encode_reply(req_id, ErrorReply(code=e.code, message=str(e)))
            except ConfigError as e:
                reply = encode_reply(req_id, ErrorReply(code="invalid_config", message=str(e)))
            except STORE_ERRORS as e:
                log.error("request failed on the store: %s", e)
                reply = encode_reply(
                    req_id,
                    ErrorReply(
                        code="unavailable",
                        message=f"the daemon's store cannot be written ({type(e).__name__}: {e})",
                    ),
                )
            except Exception as e:  # the daemon serves on whatever one request did
                log.exception("request failed")
                reply = encode_reply(req_id, ErrorReply(code="internal", message=f"{type(e).__name__}: {e}"))
            try:
                sock.send_multipart(prefix + reply, zmq.NOBLOCK)
            except zmq.Again:
                self.stalled.mark(ident)
            except zmq.ZMQError:
                pass  # the client has gone
            self.events.flush()

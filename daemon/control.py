"""Control requests: read from each control socket, checked (size, frames, a still-authorized CURVE
key, a store that can answer), handled (daemon/handlers.py) and answered; a client that reads no
replies is left alone until it does."""

from __future__ import annotations

import logging

import zmq

from dallm.client.transport import KeyWatch
from dallm.config import ConfigError
from dallm.daemon import handlers, revoke
from dallm.daemon.limits import StalledPeers
from dallm.daemon.spill import STORE_ERRORS
from dallm.daemon.worker_messages import WorkerMessages
from dallm.protocol import ErrorReply, ProtocolError, decode_request, encode_reply

log = logging.getLogger("dallm.daemon")


class ControlServer(WorkerMessages):
    """Serves control requests; a part of Daemon (the attributes below are set by its __init__)."""

    control: list[zmq.Socket]
    curve_control: set[zmq.Socket]
    keywatch: KeyWatch | None
    stalled: StalledPeers

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
                if self.spill:  # an answer now would be stale or fail to commit: say why instead
                    raise ProtocolError("unavailable", self.spill.message())
                if sock in self.curve_control and not self._key_still_authorized(raw[-1]):
                    raise ProtocolError("unauthorized", "this client key is no longer authorized")
                reply = handlers.handle(self, req_id, req, local=sock is self.control[0])
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
            self.flush()

    def _key_still_authorized(self, frame: zmq.Frame) -> bool:
        """A CURVE connection outlives its key's removal from authorized/: check each request."""
        if self.keywatch is None:
            return False
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return False
        return self.keywatch.allowed(user)

    def _check_keys(self, now: float) -> None:
        """Re-read authorized/ (every second, at once after SIGHUP); cut a removed key's subscriptions."""
        if self.keywatch is not None:
            revoke.check(self, self.keywatch, now)

    def reload_keys(self) -> None:
        """SIGHUP: re-read authorized/ at the next loop turn."""
        if self.keywatch is not None:
            self.keywatch.request()

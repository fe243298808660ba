"""Endpoints and CURVE keys, shared by the daemon and its clients: TCP endpoints (the event socket
next to a control endpoint), loopback checks, and CURVE for TCP binds beyond loopback.

The daemon's key pair lives in <home>/keys/server.key(_secret); client public keys allowed to
connect are the *.key files in <home>/keys/authorized/. A ZAP handler (pyzmq's ThreadAuthenticator)
checks every TCP connection: plaintext clients and clients with unknown keys never complete the
handshake, so their requests are never seen. IPC sockets (0700 run folder) need no keys; a loopback
TCP bind is allowed without CURVE.

Clients: `DaemonClient(endpoint, server_key=<server.key>, client_key=<NAME.key_secret>)`, or the
environment variables DALLM_SERVER_KEY and DALLM_CLIENT_KEY.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = b"dallm"


def parse_tcp(endpoint: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+)", endpoint)
    return (m.group(1).strip("[]"), int(m.group(2))) if m else None


def is_loopback(endpoint: str) -> bool:
    hostport = parse_tcp(endpoint)
    if hostport is None:
        return endpoint.startswith("ipc://") or endpoint.startswith("inproc://")
    host = hostport[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: treat as reachable from outside


def event_endpoint(control: str) -> str:
    """The PUB endpoint next to a TCP control endpoint: the next port."""
    hostport = parse_tcp(control)
    if hostport is None:
        raise ValueError(f"--bind {control!r}: expected tcp://HOST:PORT")
    host, port = hostport
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{port + 1}"


def server_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the daemon, created on first use."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = keys_dir / "server.key_secret"
    if not secret.exists():
        zmq.auth.create_certificates(keys_dir, "server")
        secret.chmod(0o600)
    public, private = zmq.auth.load_certificate(secret)
    assert private is not None
    return public, private


def authorized_dir(keys_dir: Path) -> Path:
    d = keys_dir / "authorized"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def create_client_keys(keys_dir: Path, name: str) -> tuple[Path, Path]:
    """A client key pair in <keys>/clients/, its public half authorized. Returns (public, secret) paths."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError(f"client name {name!r}: letters, digits, . _ - only")
    clients = keys_dir / "clients"
    clients.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.auth.create_certificates(clients, name)
    Path(secret).chmod(0o600)
    shutil.copy(public, authorized_dir(keys_dir) / f"{name}.key")
    return Path(public), Path(secret)


def start_authenticator(ctx: zmq.Context, keys_dir: Path) -> ThreadAuthenticator:
    allowed = authorized_dir(keys_dir)
    if not any(allowed.glob("*.key")):
        raise RuntimeError(
            f"a TCP bind beyond loopback needs CURVE client keys: none in {allowed} "
            "(create one with `dallm-daemon keys --client NAME`)"
        )
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=str(allowed))
    return auth


def make_curve_server(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN


def make_curve_client(sock: zmq.Socket, server_key: str | Path, client_key: str | Path) -> None:
    server_public, _ = zmq.auth.load_certificate(server_key)
    public, secret = zmq.auth.load_certificate(client_key)
    if secret is None:
        raise ValueError(f"{client_key}: not a secret key file (use NAME.key_secret)")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret

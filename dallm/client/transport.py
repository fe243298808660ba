"""Endpoints and CURVE keys, shared by the daemon and its clients: TCP endpoints (the event socket
next to a control endpoint), loopback checks, and CURVE for every TCP bind, loopback included.

The daemon's key pair lives in <home>/keys/server.key(_secret); client public keys allowed to
connect are the *.key files in <home>/keys/authorized/. A ZAP handler (pyzmq's ThreadAuthenticator)
checks every TCP connection: plaintext clients and clients with unknown keys never complete the
handshake, so their requests are never seen. IPC sockets (0700 run folder) need no keys.

Why CURVE on loopback too, not a token file: a loopback port is open to every local user, and
CURVE is the mechanism remote clients already use, so one path is tested; no secret crosses the
wire (a PLAIN token would), and revocation is the same (remove the key from authorized/). The
daemon's own user needs no options: a "local" client key pair is created in <home>/keys/clients/
(0600 in a 0700 folder) and authorized; the client library finds it through the home.

Keys are re-read when authorized/ changes (or on SIGHUP): a removed key cannot connect again, and
requests still arriving on its open connection are refused (`KeyWatch`, `peer_key`).

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
LOCAL_CLIENT = "local"  # the key pair of the daemon's own user (CLI/TUI on this machine)


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


def local_client_key_paths(keys_dir: Path) -> tuple[Path, Path]:
    """(public, secret) paths of the daemon user's own client key pair."""
    clients = keys_dir / "clients"
    return clients / f"{LOCAL_CLIENT}.key", clients / f"{LOCAL_CLIENT}.key_secret"


def ensure_local_client_key(keys_dir: Path) -> Path:
    """The local key pair (created on first use) authorized; returns its secret key file."""
    public, secret = local_client_key_paths(keys_dir)
    if not secret.exists():
        create_client_keys(keys_dir, LOCAL_CLIENT)
    authorized = authorized_dir(keys_dir) / f"{LOCAL_CLIENT}.key"
    if not authorized.exists():
        shutil.copy(public, authorized)
    return secret


def check_key_folders(keys_dir: Path) -> None:
    """UnsafeFolder (one line) when someone else could add a key: then the bind would be open."""
    from dallm.client.private import make_private_dir

    make_private_dir(keys_dir, "keys folder")
    make_private_dir(authorized_dir(keys_dir), "authorized keys folder")


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError(
            "a TCP bind needs CURVE, which this libzmq lacks; refusing to listen unauthenticated"
        )


def remote_keys(keys_dir: Path) -> list[Path]:
    """Authorized client keys other than the local one."""
    return [k for k in authorized_dir(keys_dir).glob("*.key") if k.name != f"{LOCAL_CLIENT}.key"]


def start_authenticator(ctx: zmq.Context, keys_dir: Path) -> ThreadAuthenticator:
    allowed = authorized_dir(keys_dir)
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


def authorized_signature(keys_dir: Path) -> tuple:
    """What changes when a key is added, removed or rewritten in authorized/."""
    out = []
    for k in sorted(authorized_dir(keys_dir).glob("*.key")):
        try:
            st = k.stat()
        except OSError:
            continue
        out.append((k.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def authorized_public_keys(keys_dir: Path) -> set[bytes]:
    """The Z85 public keys in authorized/ (as the ZAP handler reports them in User-Id)."""
    keys = set()
    for k in authorized_dir(keys_dir).glob("*.key"):
        try:
            public, _ = zmq.auth.load_certificate(k)
        except (OSError, ValueError):
            continue
        keys.add(public)
    return keys


class KeyWatch:
    """Re-reads authorized/ when it changes (checked at most every `every_s`, or at once after
    `request()`, e.g. on SIGHUP): the authenticator refuses removed keys from then on, and
    `allowed(user_id)` refuses requests on connections a removed key opened before."""

    def __init__(self, auth: ThreadAuthenticator, keys_dir: Path, every_s: float = 1.0) -> None:
        self.auth, self.keys_dir, self.every_s = auth, keys_dir, every_s
        self.signature = authorized_signature(keys_dir)
        self.keys = authorized_public_keys(keys_dir)
        self.next_check = 0.0

    def request(self) -> None:
        self.next_check = 0.0

    def poll(self, now: float) -> bool:
        """True when the keys were reloaded."""
        if now < self.next_check:
            return False
        self.next_check = now + self.every_s
        sig = authorized_signature(self.keys_dir)
        if sig == self.signature:
            return False
        self.signature = sig
        self.keys = authorized_public_keys(self.keys_dir)
        self.auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=str(authorized_dir(self.keys_dir)))
        return True

    def allowed(self, user_id: str | None) -> bool:
        return user_id is not None and user_id.encode() in self.keys

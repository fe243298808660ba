# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Security: a 0700 run folder for IPC sockets, CURVE for TCP beyond loopback (unknown and
plaintext clients refused), and job output that cannot leave the home."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from daemon_helpers import config, daemons, home, wait_state  # noqa: F401

from dallm.client.client import DaemonClient, DaemonError, DaemonUnavailable
from dallm.client.home import DaemonPaths
from dallm.client.transport import create_client_keys, is_loopback


def free_port() -> int:
    """A port whose next port is free too (events bind on PORT+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def test_ipc_sockets_live_in_a_private_run_folder(daemons, home: Path) -> None:
    daemons()
    paths = DaemonPaths(home)
    for folder in (home, paths.state_dir, paths.socket_dir, paths.jobs):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for name in ("control", "events", "workers"):
        assert (paths.socket_dir / f"{name}.ipc").stat().st_mode & 0o077 == 0


def test_job_output_cannot_escape_the_home(daemons, home: Path) -> None:
    d = daemons()
    with d.client() as c:
        with pytest.raises(DaemonError) as err:
            c.submit(config("a") | {"output_dir": "../../etc"})
        assert err.value.code == "invalid_config" and "output_dir" in str(err.value)
        with pytest.raises(DaemonError) as err:
            c.submit(config("a") | {"name": "../../x"})
        assert err.value.code == "invalid_config" and "name" in str(err.value)
        missing = f"{tempfile.gettempdir()}/nonexistent-folder"  # inside the allowed temp folder
        with pytest.raises(DaemonError, match=f"data.dir: folder {missing} does not exist") as err:
            c.submit(config("a", data={"dir": missing}))
        assert err.value.code == "preflight_failed"
        with pytest.raises(DaemonError, match="data.dir: rel/dir is relative"):
            c.submit(config("a", data={"dir": "rel/dir"}))
        assert c.jobs() == []  # nothing queued
        job = c.submit(config("ok", steps=2) | {"output_dir": "sub/dir"})
        assert Path(job.out_dir) == (home / "jobs" / "sub" / "dir").resolve()
        assert wait_state(c, job.id, "finished")


def test_non_loopback_tcp_needs_curve_keys(home: Path) -> None:
    port = free_port()
    res = subprocess.run(
        [sys.executable, "-m", "dallm.daemon.cli", "start", "--foreground", "--home", str(home),
         "--bind", f"tcp://0.0.0.0:{port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and "CURVE" in res.stderr


def test_curve_refuses_unknown_and_plaintext_clients(daemons, home: Path) -> None:
    keys = DaemonPaths(home).keys
    home.mkdir(parents=True)
    _, good = create_client_keys(keys, "alice")
    import zmq.auth

    stranger_dir = home.parent / "stranger"
    stranger_dir.mkdir()
    _, bad = zmq.auth.create_certificates(stranger_dir, "mallory")
    port = free_port()
    assert not is_loopback(f"tcp://0.0.0.0:{port}")
    daemons("--bind", f"tcp://0.0.0.0:{port}")
    server = keys / "server.key"
    endpoint = f"tcp://127.0.0.2:{port}"
    with DaemonClient(endpoint, server_key=server, client_key=good, timeout=5) as c:
        assert c.ping().home == str(home)
        job = c.submit(config("remote", steps=2))
        with c.subscribe([f"job/{job.id}/"], since=0) as sub:
            assert sub.get(timeout=10) is not None
    for kw in ({"server_key": server, "client_key": bad}, {}):  # no keys: refused before connecting
        with pytest.raises(DaemonUnavailable):
            DaemonClient(endpoint, timeout=1.0, home=home.parent / "elsewhere", **kw).ping()


def test_loopback_tcp_with_the_homes_local_key(daemons, home: Path) -> None:
    port = free_port()
    daemons("--bind", f"tcp://127.0.0.1:{port}")
    with DaemonClient(f"tcp://127.0.0.1:{port}", home=home, timeout=5) as c:
        assert c.ping().events[-1] == f"tcp://127.0.0.1:{port + 1}"


def test_job_paths_confined_to_the_roots(daemons, home: Path, tmp_path: Path) -> None:
    """Outputs and inputs outside jobs/, --allow and (own CLI only) the config's folder are refused,
    with the same words whether the path exists or not."""
    from conftest import write_images

    allowed = tmp_path / "allowed"
    write_images(allowed / "data", 2)
    cfg_dir = tmp_path / "configs"
    write_images(cfg_dir / "data", 2)
    d = daemons("--allow", str(allowed), DALLM_ALLOW="")
    with d.client() as c:
        for bad in ({"output_dir": "/etc/dallm-out"}, {"data": {"dir": "/etc"}}, {"eval": {"val_dir": "/root"}},
                    {"model": {"base": "/etc/ssl"}}):  # fmt: skip
            with pytest.raises(DaemonError) as err:
                c.submit(config("a") | bad)
            assert err.value.code == "invalid_config" and "outside the folders" in str(err.value)
        messages = set()
        for probe in ("/etc/passwd", "/etc/no-such-file-here"):
            with pytest.raises(DaemonError) as err:
                c.submit(config("a", data={"dir": probe}))
            messages.add(str(err.value).replace(probe, "P"))
        assert len(messages) == 1  # /etc/passwd exists, the other does not: the same answer
        link = allowed / "link"
        link.symlink_to("/etc")
        with pytest.raises(DaemonError, match="outside the folders"):
            c.submit(config("a", data={"dir": str(link)}))  # a symlink cannot lead out
        # The config's own folder counts for our own CLI (IPC), not without it.
        in_cfg = config("b", steps=2, data={"dir": str(cfg_dir / "data")})
        with pytest.raises(DaemonError, match="outside the folders"):
            c.submit(in_cfg)
        job = c.submit(in_cfg, config_dir=cfg_dir)
        out = allowed / "out"
        job2 = c.submit(config("c", steps=2, data={"dir": str(allowed / "data")}) | {"output_dir": str(out)})
        assert wait_state(c, job.id, "finished") and wait_state(c, job2.id, "finished")
        assert len(c.jobs()) == 2
    # Files the job wrote are the daemon user's only (umask 077).
    modes = {p.stat().st_mode & 0o077 for p in [out, *out.rglob("*")]}
    assert modes == {0}, modes


def test_tcp_client_does_not_get_the_config_folder(daemons, home: Path, tmp_path: Path) -> None:
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "data").mkdir(parents=True)
    port = free_port()
    daemons("--bind", f"tcp://127.0.0.1:{port}", DALLM_ALLOW="")
    c = DaemonClient(f"tcp://127.0.0.1:{port}", home=home, timeout=5)
    with c, pytest.raises(DaemonError, match="outside the folders"):
        c.submit(config("b", data={"dir": str(cfg_dir / "data")}), config_dir=cfg_dir)

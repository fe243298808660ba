"""Whether a Ray cluster may run this daemon's jobs (issue 25): a Ray task runs as whoever started
its node and may be submitted by anyone who reaches the cluster's ports. Without authentication,
any local user could join a node (`ray start --address=HEAD:6379`) or submit a task, and a task on
the daemon's own node runs as the daemon's user: the promises of docs/daemon.md about "another
local user" no longer hold. Ray (2.5x and later) has token authentication (RAY_AUTH_MODE=token,
the token in RAY_AUTH_TOKEN or ~/.ray/auth_token): a node that does not have the token cannot join,
a client without it cannot submit.

`check_trust` asks every live node, by a task pinned to it, whether it runs with token
authentication, and looks at Ray's session folder on this machine. Where either is open it refuses
to start, unless the daemon's user passed `--trust-cluster`: then the returned line (logged at
start) says what that trust means.

The per-attempt CURVE secret a worker uses for the relay is not a task argument (a task's arguments
are readable by every user of the cluster): the daemon writes it into the job folder (0600, the
daemon's user's, dallm/jobfiles.py) and the task reads it there (`SECRET_FILE`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 60.0
SECRET_FILE = ".worker-key"  # in the job folder: this attempt's CURVE secret (Z85), 0600


def node_auth() -> bool:
    """A probe task: True when this node's Ray runs with token authentication."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # a Ray without token authentication
        return False
    return bool(is_token_auth_enabled())


def _reachable(folder: Path) -> bool:
    """Whether every folder above `folder` lets other users through (o+x)."""
    for above in folder.parents:
        try:
            if not os.stat(above).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def session_problem(folders: list[Path]) -> str | None:
    """Why Ray's session folder (or the folder holding it) on this machine is open to other users,
    or None. Ray makes its folders 0777 itself: one inside a folder others cannot enter is closed."""
    for folder in folders:
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX and _reachable(folder):
            return f"Ray's folder {folder} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _session_folders(ray: Any) -> list[Path]:
    try:
        session = Path(ray.get_runtime_context().get_temp_dir())
    except Exception:  # noqa: BLE001 - a Ray client connection has no local session
        return []
    return [session.parent, session]


def check_trust(ray: Any, trust: bool) -> str:
    """The line the start logs about the cluster's trust; RuntimeError (one line) when the cluster
    is open to others and `trust` (--trust-cluster) was not given."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(node_auth)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    ]
    try:
        modes = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the Ray authentication check got no answer from every node within "
                           f"{PROBE_TIMEOUT_S:g} s") from None  # fmt: skip
    open_nodes = sorted(n["NodeManagerAddress"] for n, token in zip(nodes, modes, strict=True) if not token)
    problems = [f"node(s) {', '.join(open_nodes)} run without token authentication"] if open_nodes else []
    fixes = ["start every node with RAY_AUTH_MODE=token"] if open_nodes else []
    session = session_problem(_session_folders(ray))
    if session:
        problems.append(session)
        fixes.append("put Ray's --temp-dir inside a folder only its user may enter")
    if not problems:
        return "Ray cluster: token authentication on every node (RAY_AUTH_MODE=token)"
    what = "; ".join(problems)
    uid = os.geteuid()
    if not trust:
        raise RuntimeError(
            f"--executor ray: the Ray cluster is open ({what}): whoever can reach it runs code as this "
            f"daemon's user (uid {uid}) and reads its job folders; {' and '.join(fixes)} (docs/cluster.md), "
            "or pass --trust-cluster to accept that"
        )
    return (
        f"Ray cluster TRUSTED by --trust-cluster although open ({what}): every user who can reach it "
        f"has the rights of this daemon's user (uid {uid}); docs/daemon.md's promises about other "
        "local users do not hold"
    )


def read_secret(folder: Path) -> str:
    """In the task: this attempt's CURVE secret, from the job folder ("" when unreadable)."""
    from dallm.jobfiles import read_fd

    try:
        with os.fdopen(read_fd(folder, SECRET_FILE), "rb") as f:
            return f.read(256).decode().strip()
    except (OSError, RuntimeError):
        return ""

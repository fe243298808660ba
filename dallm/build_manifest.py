"""MANIFEST.json, the last file `dallm micro build` and `dallm micro build-llm` write: the build's
command, settings, seconds, versions and figures, with the sha256 and size of every file it wrote, so
a shipped model can be checked against the build that made it. One definition for both builds."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

MANIFEST = "MANIFEST.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def device_name(dev: torch.device) -> str:
    """The device a build ran on, as the manifest records it (a CPU with its thread count)."""
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def versions(*libraries: ModuleType) -> dict[str, str]:
    """Python's, torch's and each given library's version, by the library's name."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{lib.__name__: lib.__version__ for lib in libraries},
    }


def write_manifest(out: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write `fields`, then the total size and the sha256 and size of every file under `out` (the
    manifest itself aside), to `out`/MANIFEST.json; return what was written."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(out).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    manifest = {**fields, "total_bytes": sum(f["bytes"] for f in files.values()), "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["MANIFEST", "device_name", "sha256", "versions", "write_manifest"]

"""Features that do not change between evaluations, shared between jobs and sweeps.

The base model's eval images depend only on the base weights, the prompts, the initial noise (seed
and shape), the sampler (DDIM, eta 0, steps, guidance), the resolution and the weight dtype; their
features also on the feature extractor. A target folder's features depend only on its files and the
extractor. Each entry is one file `<root>/<sha256 of its key>.pt` holding the key itself (compared
on read, so a hash collision or a foreign file is a miss) and the features; a new entry is written
to a private temporary name and renamed into place, so jobs that share the folder never see a torn
file. A base model given as a local folder is identified by its path and the size and mtime of
every file in it (weights replaced in place are a miss).

Root: `eval.cache_dir`, else `$DALLM_CACHE`, else `<dallm home>/cache/eval` (the daemon's home when
the job runs under it: `DALLM_HOME`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "DALLM_CACHE"


def cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    from dallm.client.home import default_home

    return default_home() / "cache" / "eval"


def files_fingerprint(paths: list[Path]) -> list[list[Any]]:
    """(path, size, mtime_ns) of each file: what a folder's features depend on besides the extractor."""
    out: list[list[Any]] = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def model_fingerprint(source: str) -> list[Any]:
    """The base model's identity: its name, and for a local folder its files' sizes and mtimes."""
    folder = Path(source)
    if not folder.is_dir():
        return [source]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [str(folder.resolve()), *files_fingerprint(files)]


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:40]


class FeatureCache:
    """Feature tensors under `root`, looked up by a JSON-able key; `enabled` False: always a miss."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root, self.enabled = Path(root), enabled
        self.hits = 0
        self.misses = 0

    def path(self, key: dict[str, Any]) -> Path:
        return self.root / f"{key_hash(key)}.pt"

    def get(self, key: dict[str, Any]) -> torch.Tensor | None:
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            saved = torch.load(path, weights_only=True)
        except FileNotFoundError:
            saved = None
        except Exception as e:  # a torn or foreign file: computed again and replaced
            log.warning("ignoring %s: %s", path, e)
            saved = None
        if isinstance(saved, dict) and saved.get("key") == json.loads(json.dumps(key, default=str)):
            self.hits += 1
            return saved["features"]
        self.misses += 1
        return None

    def put(self, key: dict[str, Any], features: torch.Tensor) -> None:
        if not self.enabled:
            return
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"key": json.loads(json.dumps(key, default=str)), "features": features}, tmp)
            tmp.replace(path)
        except OSError as e:  # a read-only or full cache folder costs speed, not the job
            log.warning("feature cache %s not written: %s", path, e)


__all__ = ["CACHE_ENV", "FeatureCache", "cache_root", "files_fingerprint", "key_hash", "model_fingerprint"]

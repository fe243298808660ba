"""What a submitted job may touch: the folders it writes (output_dir) and reads (data, class and
validation images, a local model, feature weights) must lie under the daemon's roots.

Roots: the home's jobs/ folder, the folders the daemon's user allowed (`dallm-daemon start --allow
DIR`, or $DALLM_ALLOW, os.pathsep-separated), and, for a request over the IPC socket (only the
daemon's own user can reach its 0700 folder), the folder of the submitted config file. A TCP client
(a CURVE key holder, possibly someone else) gets jobs/ and the allowed folders only.

Paths are compared after resolving symlinks and `..`, so a link cannot lead out. A path outside the
roots is refused before anything looks at it: the error is the same whether it exists or not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dallm.config.job import folder_name
from dallm.jobfiles import job_folder_problem
from dallm.protocol import ProtocolError

ALLOW_ENV = "DALLM_ALLOW"


def parse_allow(values: list[str] | None, env: str | None = None) -> tuple[Path, ...]:
    """The allowed folders from --allow and $DALLM_ALLOW: absolute, existing folders, resolved."""
    env = os.environ.get(ALLOW_ENV, "") if env is None else env
    items = [*(values or []), *(e for e in env.split(os.pathsep) if e)]
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        where = f"--allow {item}" if item in (values or []) else f"${ALLOW_ENV}: {item}"
        if not p.is_absolute():
            raise ValueError(f"{where}: not an absolute path")
        if not p.is_dir():
            raise ValueError(f"{where}: not a folder")
        out.append(p.resolve())
    return tuple(out)


@dataclass(frozen=True)
class Roots:
    jobs: Path
    allowed: tuple[Path, ...] = ()

    def for_request(self, local: bool, config_dir: str | None) -> tuple[Path, ...]:
        """The roots of one submit: the config's own folder only for the daemon's user (IPC)."""
        roots = [self.jobs.resolve(), *self.allowed]
        if local and config_dir and Path(config_dir).is_absolute():
            roots.append(Path(config_dir).resolve())
        return tuple(roots)


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    real = path.expanduser().resolve()
    return any(real.is_relative_to(r) for r in roots)


def outside_message(source: str, key: str, value: object, roots: tuple[Path, ...]) -> str:
    names = ", ".join(str(r) for r in roots)
    return (
        f"{source}: {key}: {value} is outside the folders this daemon may use ({names}); "
        "allow a folder with `dallm-daemon start --allow DIR`"
    )


def read_paths(cfg: Any) -> Iterator[tuple[str, Path, bool]]:
    """(key, path, must be a folder) of everything on disk a job reads, from a JobConfig."""
    for key, value in (
        ("data.dir", cfg.data.dir),
        ("data.class_dir", cfg.data.class_dir),
        ("eval.val_dir", cfg.eval.val_dir),
    ):
        if value is not None:
            yield key, Path(value), True
    for key in ("train", "validation", "base"):  # LLM jobs' text files
        for path in getattr(cfg.data, key):
            yield f"data.{key}", Path(path), False
    if cfg.eval.inception_weights is not None:
        yield "eval.inception_weights", Path(cfg.eval.inception_weights), False
    base = cfg.model.base
    if base.startswith(("/", ".", "~")):  # a local model folder (else "micro" or a hub id)
        yield "model.base", Path(base), False
    features = cfg.eval.features
    if features.startswith("clip:"):
        yield "eval.features", Path(features[len("clip:") :]), False


def check_reads(cfg: Any, source: str, roots: tuple[Path, ...]) -> None:
    """ProtocolError invalid_config (one line) for a relative path or one outside the roots. Whether
    the files are there is the preflight's part, asked only after this: existence inside the roots."""
    for key, path, _folder in read_paths(cfg):
        if not path.expanduser().is_absolute():
            raise ProtocolError(
                "invalid_config", f"{source}: {key}: {path} is relative; the daemon needs an absolute path"
            )
        if not inside(path, roots):
            raise ProtocolError("invalid_config", outside_message(source, key, path, roots))


def output_folder(
    jobs: Path, job: int, name: str, output_dir: str | None, roots: tuple[Path, ...], source: str = "config"
) -> Path:
    """The job's output folder: <jobs>/<id>-<name>, a relative output_dir under <jobs> (it may not
    leave it), or an absolute one under the roots. ProtocolError invalid_config otherwise."""
    jobs = jobs.resolve()
    if output_dir is None:
        return jobs / f"{job}-{folder_name(name)}"
    p = Path(output_dir).expanduser()
    if not p.is_absolute():
        out = (jobs / p).resolve()
        if not out.is_relative_to(jobs):
            raise ProtocolError(
                "invalid_config", f"output_dir: {output_dir!r} leaves the daemon's jobs folder"
            )
        return out
    if not inside(p, roots):
        raise ProtocolError("invalid_config", outside_message(source, "output_dir", output_dir, roots))
    out = p.resolve()
    problem = job_folder_problem(out)  # someone else's folder: files in it may be their links
    if problem:
        raise ProtocolError("invalid_config", f"{source}: output_dir: {out} {problem}; refusing to use it")
    return out

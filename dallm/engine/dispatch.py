"""`train(cfg)`: run one job, in the foreground or inside a daemon worker (the `dallm.protocol.Engine`
the worker starts by default). It resolves the output folder and the checkpoint to resume from,
then hands the job to its kind's setup: `dallm.image.train.train_image` or
`dallm.llm.train.train_llm`; both end in the one loop, `dallm.engine.job.Job`.
"""

from __future__ import annotations

from pathlib import Path

from dallm.config import ConfigError, JobConfig
from dallm.engine.checkpoint import find_checkpoint
from dallm.protocol import Emit, JobEvent, JobResult, PhaseEmit, Poll

__all__ = ["JobResult", "train"]


def _noop(_: JobEvent) -> None:
    pass


def train(
    cfg: JobConfig,
    *,
    out_dir: Path | None = None,
    resume: Path | None = None,
    emit: Emit | None = None,
    poll: Poll | None = None,
) -> JobResult:
    """Run the job `cfg` into `out_dir` (default `cfg.out`), from scratch or from a checkpoint.

    `resume` is a checkpoint folder or an output folder (its latest checkpoint); without `out_dir`
    the run continues in the output folder the checkpoint belongs to.
    """
    ckpt = None
    if resume is not None:
        try:
            ckpt = find_checkpoint(Path(resume))
        except FileNotFoundError as e:
            raise ConfigError(f"--resume: {e}") from None
    if out_dir is None:
        out_dir = ckpt.parent.parent if ckpt is not None and ckpt.parent.name == "checkpoints" else cfg.out
    out = Path(out_dir)
    phases = PhaseEmit(emit or _noop)
    if cfg.model.kind == "llm":
        from dallm.llm.train import train_llm  # transformers and peft's LLM side load only for LLM jobs

        return train_llm(cfg, out, ckpt, phases, poll)
    from dallm.image.train import train_image

    return train_image(cfg, out, ckpt, phases, poll)

"""An LLM LoRA job: `train_llm(cfg)`, what `dallm.engine.job.train` runs for `[model] kind = "llm"`.

Reading order: read the texts (a bad file fails before the model loads), load the model with its
LoRA, then hand `dallm.engine.job.Job` the LLM's trainer and evaluator. The loop, commands, CS /
CS-Fluctuation, turning point, snapshots, checkpoints, rollback, resume and the result are the
image job's code, unchanged: only what a step trains and what an evaluation measures differ.
"""

from __future__ import annotations

from pathlib import Path

from dallm.config import JobConfig
from dallm.engine.job import Job, PhaseEmit, seed_everything
from dallm.image.trainer import pick_device
from dallm.llm.data import load_texts
from dallm.llm.evaluation import LlmEvaluator
from dallm.llm.model import load_llm
from dallm.llm.trainer import LlmTrainer
from dallm.monitor.early_stop import EarlyStop
from dallm.protocol import JobResult, LogEvent, Poll


def train_llm(cfg: JobConfig, out: Path, ckpt: Path | None, emit: PhaseEmit, poll: Poll | None) -> JobResult:
    """Run the LLM job `cfg` into `out`, from scratch or from the checkpoint folder `ckpt`
    (`dallm.engine.job.train` resolves both, and calls this for `model.kind = "llm"`)."""
    texts = load_texts(cfg.data, cfg.seed)  # fails fast on a bad file
    if not texts.validation:
        emit(
            LogEvent(
                level="warning",
                message="no validation texts (data.validation, data.val_fraction): no ppl_val",
            )
        )
    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    parts = load_llm(cfg, device)
    trainer = LlmTrainer(cfg, parts, texts, device)
    has_val = bool(texts.validation) and cfg.eval.every > 0
    early = (
        EarlyStop(parts.model, cfg, has_val_kid=has_val, train_size=len(texts.train))
        if cfg.monitor.cs
        else None
    )
    evaluator = None
    if cfg.samples.every or cfg.eval.every:
        evaluator = LlmEvaluator(cfg, parts, texts, out, emit)
        evaluator.attach(early, trainer.weights)
    job = Job(cfg, trainer, early, evaluator, out, emit, poll)
    try:
        return job.run(ckpt)
    finally:
        job.log.close()

"""An LLM LoRA job: `train_llm(cfg)`, what `dallm.engine.dispatch.train` runs for `[model] kind = "llm"`.

Reading order: read the texts (a bad file fails before the model loads), load the model with its
LoRA, then hand `dallm.engine.job.Job` the LLM's trainer and evaluator. The loop, commands, CS /
CS-Fluctuation, turning point, snapshots, checkpoints, rollback, resume and the result are the
image job's code, unchanged: only what a step trains and what an evaluation measures differ.
"""

from __future__ import annotations

from pathlib import Path

from dallm.config import JobConfig
from dallm.engine.job import Job
from dallm.engine.training import pick_device, seed_everything
from dallm.eval.interface import Evaluator, NoEvaluator
from dallm.eval.schedule import eval_schedule
from dallm.llm.data import load_texts
from dallm.llm.evaluation import LlmEvaluator
from dallm.llm.model import load_llm
from dallm.llm.trainer import LlmTrainer
from dallm.monitor.early_stop import EarlyStop, NoEarlyStop
from dallm.protocol import JobResult, LogEvent, PhaseEmit, Poll


def train_llm(cfg: JobConfig, out: Path, ckpt: Path | None, emit: PhaseEmit, poll: Poll | None) -> JobResult:
    """Run the LLM job `cfg` into `out`, from scratch or from the checkpoint folder `ckpt`
    (`dallm.engine.dispatch.train` resolves both, and calls this for `model.kind = "llm"`)."""
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
    schedule = eval_schedule(cfg).with_validation(bool(texts.validation))
    early = (
        EarlyStop(parts.model, cfg, has_validation=schedule.compares_validation, train_size=len(texts.train))
        if cfg.monitor.cs
        else NoEarlyStop()
    )
    evaluator: Evaluator = NoEvaluator(schedule)
    if schedule.active:
        evaluator = LlmEvaluator(cfg, parts, texts, out, emit, schedule)
    job = Job(cfg, trainer, early, evaluator, out, emit, poll)
    try:
        return job.run(ckpt)
    finally:
        job.log.close()

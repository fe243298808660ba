"""An image LoRA job: `train_image`, what `dallm.engine.dispatch.train` runs for `[model] kind = "image"`.

Reading order: the data first (a bad image fails before the model loads), the model with its
LoRA (or the whole UNet with train.method = "full"), the trainer, the monitor and the evaluator
(`eval.mode`: in the loop or in a process of its own), then `dallm.engine.job.Job` runs the loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dallm.config import JobConfig
from dallm.engine.job import Job
from dallm.engine.training import pick_device, seed_everything
from dallm.eval.interface import Evaluator, NoEvaluator
from dallm.eval.schedule import eval_schedule
from dallm.image.data import load_training_data
from dallm.image.models import load_parts, read_resolution, resolve_base
from dallm.image.trainer import ImageTrainer
from dallm.monitor.early_stop import EarlyStop, NoEarlyStop
from dallm.protocol import JobResult, LogEvent, PhaseEmit, Poll


def train_image(
    cfg: JobConfig, out: Path, ckpt: Path | None, emit: PhaseEmit, poll: Poll | None
) -> JobResult:
    """Run the image job `cfg` into `out`, from scratch or from the checkpoint folder `ckpt`
    (`dallm.engine.dispatch.train` resolves both)."""
    device = pick_device(cfg.train.device)
    source = resolve_base(cfg.model.base)
    resolution = cfg.model.resolution or read_resolution(source, cfg.model.revision)
    images, classes = load_training_data(cfg.data, resolution)  # fails fast on a bad image
    for path, why in images.skipped + (classes.skipped if classes else []):
        emit(LogEvent(level="warning", message=f"skipped {path}: {why}"))

    seed_everything(cfg.seed)
    mixed = device.type == "cuda" and cfg.train.mixed_precision != "no"
    weight_dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.mixed_precision] if mixed else torch.float32
    )
    parts = load_parts(cfg.model, device=device, weight_dtype=weight_dtype)
    if cfg.tokens.new or cfg.lora.text_encoder:  # a trained text encoder stays float32 (autocast computes)
        parts.text_encoder.to(torch.float32)
    trainer = ImageTrainer(cfg, parts, images, classes, device)
    full = cfg.train.method == "full"  # CS / CS-Fluctuation are defined for LoRA only
    schedule = eval_schedule(cfg)
    early = (
        EarlyStop(parts.unet, cfg, has_validation=schedule.compares_validation)
        if cfg.monitor.cs and not full
        else NoEarlyStop()
    )
    evaluator: Evaluator = NoEvaluator(schedule)
    if schedule.active:
        from dallm.eval.live import LiveEvaluator

        if cfg.eval.mode == "background" and not full:  # "full" changes the base weights themselves
            from dallm.eval.background import BackgroundEvaluator

            evaluator = BackgroundEvaluator(
                cfg, parts, out, emit, device, weight_dtype, images.captions, trainer.weights
            )
        else:
            live = LiveEvaluator(cfg, parts, out, emit, device, weight_dtype, images.captions)
            if full and ckpt is None:  # the base model's samples and KID features before its weights move
                live.prime_base()
            evaluator = live
    try:
        job = Job(cfg, trainer, early, evaluator, out, emit, poll)
        try:
            return job.run(ckpt)
        finally:
            job.log.close()
    finally:
        evaluator.close()

"""One training step and the state around it: the model with LoRA (and new tokens), the optimizer,
the LR schedule, the loss, and capturing / restoring everything an exact resume needs.

`dallm.engine.job.train` drives a `Trainer`: it decides when to step, checkpoint, evaluate and stop.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dallm.config import ConfigError, JobConfig, TrainConfig
from dallm.engine.checkpoint import (
    TrainState,
    capture_rng,
    deep_copy_state,
    restore_rng,
)
from dallm.engine.lora import add_lora, has_lora, load_lora_state, lora_parameters, lora_scalings, lora_state
from dallm.image.data import ImageSet, batch_indices
from dallm.image.export import diffusers_lora_dict, emb_file_name, save_embeddings, save_lora
from dallm.image.models import ModelParts
from dallm.image.tokens import NewTokens, add_tokens

CLASS_SEED_OFFSET = 7919
UNET_FILE = "diffusion_pytorch_model.safetensors"  # class images are drawn from their own shuffled sequence
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests swap in a cheaper one


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    return torch.device(name)


def _scale(model: Any) -> float:
    values = set(lora_scalings(model).values())
    return values.pop() if len(values) == 1 else 1.0


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run evaluation without touching the training RNG streams (resume stays exact)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def diffusion_target(sched: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at timesteps `t`: the noise (epsilon) or the velocity (v-prediction).

    The training loss and the validation loss (`dallm.eval.val_loss`) both use it.
    """
    return noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)


def optimizer_and_schedule(
    groups: list[dict[str, Any]] | list[torch.nn.Parameter], tc: TrainConfig
) -> tuple[Any, Any]:
    """AdamW over `groups` and the LR schedule of `[train]` (image and LLM trainers alike)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        groups,
        lr=tc.lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_eps,
        weight_decay=tc.weight_decay,
    )
    name = "constant_with_warmup" if tc.lr_scheduler == "constant" and tc.warmup_steps else tc.lr_scheduler
    return optimizer, get_scheduler(
        name, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps
    )


class Trainer:
    """The model, optimizer and the per-step logic of one job."""

    def __init__(
        self, cfg: JobConfig, parts: ModelParts, images: ImageSet, classes: ImageSet | None, device
    ) -> None:
        self.cfg, self.parts, self.images, self.classes, self.device = cfg, parts, images, classes, device
        tc = cfg.train
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
        self.use_autocast = self.autocast_dtype is not None and device.type == "cuda"
        self.generator = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, flips
        self.tokens: NewTokens | None = add_tokens(
            parts.tokenizer, parts.text_encoder, cfg.tokens, self.generator
        )
        self.full = tc.method == "full"  # full fine-tuning of the UNet (a baseline): no LoRA
        if self.full:
            parts.unet.requires_grad_(True)
        else:
            add_lora(parts.unet, parts.text_encoder, cfg.lora)
        if self.tokens is not None:  # peft froze every non-LoRA weight of the text encoder
            self.tokens.embedding.requires_grad_(True)
        self.train_text_encoder = cfg.lora.text_encoder or self.tokens is not None
        if tc.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                parts.text_encoder.gradient_checkpointing_enable()
        parts.unet.train()
        parts.text_encoder.train(self.train_text_encoder)
        if tc.channels_last:  # NHWC convolutions; sampling and evaluation use the same weights
            parts.unet.to(memory_format=torch.channels_last)
        # The training forward only: evaluation samples with the eager UNet at other shapes.
        # dynamic=False: one graph per batch shape (a job has one), no symbolic shapes.
        self.unet_forward: Any = (
            torch.compile(parts.unet, backend=COMPILE_BACKEND, dynamic=False) if tc.compile else parts.unet
        )
        self._compiled_ok = not tc.compile  # set once a compiled step has run

        self.unet_params = list(parts.unet.parameters()) if self.full else lora_parameters(parts.unet)
        self.te_params = lora_parameters(parts.text_encoder) if cfg.lora.text_encoder else []
        self.ema: list[torch.Tensor] | None = (
            [p.detach().clone() for p in self.unet_params] if self.full and tc.ema_decay else None
        )
        groups: list[dict[str, Any]] = [{"params": self.unet_params, "lr": tc.lr}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": tc.text_encoder_lr or tc.lr})
        if self.tokens is not None:
            groups.append({"params": [self.tokens.embedding], "lr": cfg.tokens.lr, "weight_decay": 0.0})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer, self.lr_scheduler = optimizer_and_schedule(groups, tc)
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.use_autocast and tc.mixed_precision == "fp16" else None
        )
        self._ids: dict[str, torch.Tensor] = {}

    # -- one step ------------------------------------------------------------------------------

    def _token_ids(self, captions: list[str]) -> torch.Tensor:
        tok = self.parts.tokenizer
        for c in captions:
            if c not in self._ids:
                self._ids[c] = tok(
                    c,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
        return torch.stack([self._ids[c] for c in captions]).to(self.device)

    def _draw(self, images: ImageSet, seed: int, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
        idx = batch_indices(len(images), seed, start, n)
        pixels = images.pixels[idx]
        if self.cfg.data.random_flip:
            flip = torch.rand(n, generator=self.generator) < 0.5
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        return pixels, [images.captions[i] for i in idx]

    def micro_batch_loss(self, step: int, micro: int) -> torch.Tensor:
        """Noise-prediction loss of one micro-batch (instance, plus class images for prior preservation)."""
        cfg, parts, bs = self.cfg, self.parts, self.cfg.train.batch_size
        start = (step * cfg.train.grad_accum + micro) * bs
        pixels, captions = self._draw(self.images, cfg.seed, start, bs)
        if self.classes is not None:
            cp, cc = self._draw(self.classes, cfg.seed + CLASS_SEED_OFFSET, start, bs)
            pixels, captions = torch.cat([pixels, cp]), captions + cc
        vae_dtype = next(parts.vae.parameters()).dtype
        with torch.no_grad():
            dist = parts.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
            latents = dist.sample(generator=self.generator).float() * parts.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        sched = parts.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=self.generator)
        t = t.to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        if cfg.train.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = diffusion_target(sched, latents, noise, t)
        ids = self._token_ids(captions)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.use_autocast
        ):
            with torch.set_grad_enabled(self.train_text_encoder):
                hidden = parts.text_encoder(ids)[0]
            pred = self.unet_forward(noisy, t, hidden, return_dict=False)[0]
        pred, target = pred.float(), target.float()
        if self.classes is None:
            return F.mse_loss(pred, target)
        pred, prior_pred = pred.chunk(2)
        target, prior_target = target.chunk(2)
        return F.mse_loss(pred, target) + cfg.data.prior_loss_weight * F.mse_loss(prior_pred, prior_target)

    def step(self, step: int) -> dict[str, float]:
        """Train step `step + 1` (steps count from 1); returns loss, lr and grad_norm.

        The only device sync is at the end (reading loss and grad norm), as in a bare loop.
        """
        tc = self.cfg.train
        lr = self.lr_scheduler.get_last_lr()[0]
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            try:
                loss = self.micro_batch_loss(step, micro) / tc.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            except torch._dynamo.exc.TorchDynamoException as e:
                if self._compiled_ok:
                    raise
                inner = getattr(e, "inner_exception", None) or e  # the backend's own error
                first = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:200]}"
                raise ConfigError(
                    f"train.compile: torch.compile cannot run here ({first}); set train.compile = false"
                ) from None
            self._compiled_ok = True
            total += loss.detach()
        if step < self.cfg.tokens.ti_steps:  # textual inversion alone: LoRA waits
            for p in self.unet_params + self.te_params:
                p.grad = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        with_grad = [p for p in self.params if p.grad is not None]
        max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm) if with_grad else torch.zeros(())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            live = [p.detach() for p in self.unet_params]
            torch._foreach_lerp_(self.ema, live, 1.0 - (self.cfg.train.ema_decay or 0.0))
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.tokens is not None:
            self.tokens.restore_other_rows()
        loss_value = total.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}")
        return {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}

    # -- state ---------------------------------------------------------------------------------

    def weights(self, step: int) -> TrainState:
        te = lora_state(self.parts.text_encoder) if has_lora(self.parts.text_encoder) else None
        rows = self.tokens.rows() if self.tokens is not None else None
        if self.full:  # the whole UNet (state dict keys) in place of the LoRA tensors
            unet = {k: v.detach().to("cpu", copy=True) for k, v in self.parts.unet.state_dict().items()}
            s = TrainState(step, unet, te, rows)
            if self.ema is not None:
                names = [n for n, _ in self.parts.unet.named_parameters()]
                s.extra["ema"] = {n: e.to("cpu", copy=True) for n, e in zip(names, self.ema, strict=True)}
            return s
        return TrainState(step, lora_state(self.parts.unet), te, rows)

    def state(self, step: int) -> TrainState:
        """A real copy of everything an exact resume needs."""
        s = self.weights(step)
        s.optimizer = deep_copy_state(self.optimizer.state_dict())
        s.lr_scheduler = deep_copy_state(self.lr_scheduler.state_dict())
        s.grad_scaler = deep_copy_state(self.scaler.state_dict()) if self.scaler else None
        s.rng = capture_rng(self.generator)
        return s

    def load(self, s: TrainState) -> None:
        """Put `s` back: weights always; optimizer, scheduler and RNG when `s` has them."""
        if self.full:
            self.parts.unet.load_state_dict(s.unet_lora)
            if self.ema is not None and "ema" in s.extra:
                for e, v in zip(self.ema, s.extra["ema"].values(), strict=True):
                    e.copy_(v)
        else:
            load_lora_state(self.parts.unet, s.unet_lora)
        if s.text_encoder_lora is not None:
            load_lora_state(self.parts.text_encoder, s.text_encoder_lora)
        if s.token_rows is not None and self.tokens is not None:
            self.tokens.set_rows(s.token_rows)
        if s.optimizer is not None:
            self.optimizer.load_state_dict(deep_copy_state(s.optimizer))
        if s.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(s.lr_scheduler)
        if s.grad_scaler is not None and self.scaler is not None:
            self.scaler.load_state_dict(s.grad_scaler)
        if s.rng is not None:
            restore_rng(s.rng, self.generator)

    def write_weights(self, folder: Path, s: TrainState) -> None:
        """The result files of `s` into `folder`: LoRA (diffusers/peft keys) and token embeddings;
        with train.method = "full", the UNet (its EMA when kept) as a diffusers `unet/` folder."""
        if self.full:
            from safetensors.torch import save_file

            unet = dict(s.unet_lora) | dict(s.extra.get("ema", {}))
            (folder / "unet").mkdir(parents=True, exist_ok=True)
            self.parts.unet.save_config(folder / "unet")
            save_file({k: v.contiguous() for k, v in unet.items()}, folder / "unet" / UNET_FILE)
            if s.token_rows is not None and self.tokens is not None:
                save_embeddings(folder / emb_file_name(self.cfg.name), s.token_rows, self.tokens.tokens)
            return
        te_scale = _scale(self.parts.text_encoder) if s.text_encoder_lora else 1.0
        save_lora(
            folder, diffusers_lora_dict(s.unet_lora, s.text_encoder_lora, _scale(self.parts.unet), te_scale)
        )
        if s.token_rows is not None and self.tokens is not None:
            save_embeddings(folder / emb_file_name(self.cfg.name), s.token_rows, self.tokens.tokens)

    @property
    def trainable_params(self) -> int:
        n = sum(p.numel() for p in self.unet_params + self.te_params)
        return n + (len(self.tokens.ids) * self.tokens.embedding.shape[1] if self.tokens else 0)

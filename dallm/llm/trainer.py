"""One LLM training step and the state around it: `LlmTrainer`, the `ImageTrainer`'s twin.

`dallm.engine.job.Job` drives it exactly as it drives the image trainer (`dallm.engine.job.Trainer`:
step, state, weights, load, write_weights), so checkpoints, snapshots, rollback and resume are the
same code. The state kept is the LoRA factors only (peft keys, in `TrainState.lora`); W0 stays in
the peft base layers, where CS reads it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dallm.config import JobConfig
from dallm.engine.checkpoint import TrainState, capture_rng, deep_copy_state, restore_rng
from dallm.engine.lora import ADAPTER, load_lora_state, lora_parameters, lora_state
from dallm.engine.training import batch_indices, optimizer_and_schedule
from dallm.llm.data import Texts
from dallm.llm.model import LlmParts
from dallm.micro_llm.metrics import IGNORE, encode

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names: PeftModel.from_pretrained reads them
ADAPTER_CONFIG = "adapter_config.json"


def write_adapter(folder: Path, parts: LlmParts, lora: dict[str, torch.Tensor]) -> Path:
    """`lora` (peft keys, as get_peft_model_state_dict gives them) as a peft adapter folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = parts.lora_config
    config.base_model_name_or_path = parts.source
    config.inference_mode = True
    config.save_pretrained(str(folder))
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / ADAPTER_WEIGHTS)
    return folder / ADAPTER_WEIGHTS


class LlmTrainer:
    """The model, optimizer and per-step logic of one LLM job."""

    def __init__(self, cfg: JobConfig, parts: LlmParts, texts: Texts, device: torch.device) -> None:
        self.cfg, self.parts, self.texts, self.device = cfg, parts, texts, device
        self.generator = torch.Generator().manual_seed(cfg.seed)  # kept with the RNG state for resume
        self.params = lora_parameters(parts.model)
        self.optimizer, self.lr_scheduler = optimizer_and_schedule(self.params, cfg.train)
        parts.model.train()

    def _loss(self, step: int, micro: int) -> torch.Tensor:
        """Mean token cross-entropy of one micro-batch (texts drawn from reshuffled epochs)."""
        tc = self.cfg.train
        start = (step * tc.grad_accum + micro) * tc.batch_size
        idx = batch_indices(len(self.texts.train), self.cfg.seed, start, tc.batch_size)
        ids, labels = encode(
            self.parts.tokenizer, [self.texts.train[i] for i in idx], self.cfg.data.max_length
        )
        mask = (labels != IGNORE).long()
        out = self.parts.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), labels=labels.to(self.device)
        )
        return out.loss.float()

    def step(self, step: int) -> dict[str, float]:
        """Train step `step + 1`; returns loss, lr and grad_norm."""
        tc = self.cfg.train
        lr = self.lr_scheduler.get_last_lr()[0]
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            loss = self._loss(step, micro) / tc.grad_accum
            loss.backward()
            total += loss.detach()
        max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = total.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}")
        return {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}

    # -- state (the LoRA factors go in TrainState.lora) ----------------

    def weights(self, step: int) -> TrainState:
        return TrainState(step, lora_state(self.parts.model))

    def state(self, step: int) -> TrainState:
        """A real copy of everything an exact resume needs."""
        s = self.weights(step)
        s.optimizer = deep_copy_state(self.optimizer.state_dict())
        s.lr_scheduler = deep_copy_state(self.lr_scheduler.state_dict())
        s.rng = capture_rng(self.generator)
        return s

    def load(self, s: TrainState) -> None:
        """Put `s` back: the LoRA always; optimizer, scheduler and RNG when `s` has them."""
        load_lora_state(self.parts.model, s.lora)
        if s.optimizer is not None:
            self.optimizer.load_state_dict(deep_copy_state(s.optimizer))
        if s.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(s.lr_scheduler)
        if s.rng is not None:
            restore_rng(s.rng, self.generator)

    def write_weights(self, folder: Path, s: TrainState) -> None:
        """The LoRA of `s` as a peft adapter folder (adapter_config.json, adapter_model.safetensors)."""
        write_adapter(folder, self.parts, s.lora)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)


__all__ = ["ADAPTER", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LlmTrainer", "write_adapter"]

"""LoRA through peft: injection into the UNet (and optionally the text encoder), and its state.

The UNet uses diffusers' PEFT integration (`unet.add_adapter`), so that `disable_adapters()` /
`enable_adapters()` give base-model samples, and the text encoder uses transformers' one. The adapter
is always named "default".
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from dallm.config import ConfigError, LoraConfig

ADAPTER = "default"


def peft_config(
    rank: int, alpha: float | None, dropout: float, targets: list[str], init: str
) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(targets),
        init_lora_weights="gaussian" if init == "gaussian" else True,
    )


def _inject(model: Any, cfg: PeftLoraConfig, key: str) -> None:
    try:
        model.add_adapter(cfg, adapter_name=ADAPTER)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise ConfigError(f"{key}: {sorted(cfg.target_modules)} match no module of the model") from None
        raise


def add_lora(unet: Any, text_encoder: Any, cfg: LoraConfig) -> None:
    """Add trainable LoRA layers (float32) to the UNet, and to the text encoder when configured."""
    _inject(unet, peft_config(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.init), "lora.targets")
    if cfg.text_encoder:
        rank = cfg.text_encoder_rank or cfg.rank
        alpha = cfg.alpha if cfg.alpha is not None else None
        te_cfg = peft_config(rank, alpha, cfg.dropout, cfg.text_encoder_targets, cfg.init)
        _inject(text_encoder, te_cfg, "lora.text_encoder_targets")
    for model in (unet, text_encoder):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def has_lora(model: Any) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    """peft-format LoRA tensors (`...to_q.lora_A.weight`), detached copies on the CPU."""
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in get_peft_model_state_dict(
            model, adapter_name=ADAPTER, save_embedding_layers=False
        ).items()
    }


def load_lora_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy peft-format LoRA tensors into the model in place (exactly, keeping the Parameters)."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA state has keys the model lacks: {unexpected[:3]}")


def lora_scalings(model: Any) -> dict[str, float]:
    """alpha / rank per LoRA module, keyed by the module's name."""
    return {
        n: float(m.scaling[ADAPTER])
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and ADAPTER in m.scaling
    }

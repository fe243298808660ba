"""Loading a causal language model and putting LoRA on it (peft).

`model.base` is "micro-llm" (the shipped micro LLM), a local transformers folder or a hub id; all go
through `AutoModelForCausalLM.from_pretrained`. On a CUDA device the base weights are bf16 (fp16
where bf16 is not supported); with `model.quantize = "4bit"` they are NF4 through bitsandbytes. The
LoRA factors are float32 whatever the base (peft upcasts adapters), so optimizer steps are exact.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dallm.config import ConfigError, JobConfig
from dallm.engine.lora import ADAPTER, peft_config
from dallm.llm.source import require_bitsandbytes, resolve_llm_base


@dataclass
class LlmParts:
    model: Any  # peft PeftModelForCausalLM (the base is `model.get_base_model()`)
    tokenizer: Any
    source: str  # the folder or hub id the base came from
    lora_config: Any  # the peft LoraConfig (written with the adapter)


def weight_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load_error(source: str, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if Path(source).is_dir():
        return ConfigError(f"model.base: cannot load {source}: {first}", "model.base", first)
    reason = (
        f"cannot load {source!r} ({first}); give a local folder saved with save_pretrained, or 'micro-llm'"
    )
    return ConfigError(f"model.base: {reason}", "model.base", reason)


def load_llm(cfg: JobConfig, device: torch.device) -> LlmParts:
    """The base model (frozen) with a trainable LoRA named "default", and its tokenizer."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    source = resolve_llm_base(cfg.model.base)
    # peft asks transformers 5 a renamed question; the warning says nothing to a dallm user
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    transformers_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    kw: dict[str, Any] = {"revision": cfg.model.revision, "dtype": weight_dtype(device)}
    if cfg.model.quantize == "4bit":
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kw["dtype"]
        )
        kw["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
        model = AutoModelForCausalLM.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise _load_error(source, e) from None
    if tokenizer.pad_token_id is None:  # many LLM tokenizers have none: pad with EOS (labels mask it)
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"model.base: {source}: the tokenizer has no EOS token", "model.base", "no EOS token"
        )
    if cfg.model.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing
        )
    else:
        model.to(device)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    model.requires_grad_(False)
    lc = cfg.lora
    lora_config = peft_config(lc.rank, lc.alpha, lc.dropout, cfg.lora.targets, lc.init)
    lora_config.task_type = "CAUSAL_LM"
    try:
        peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            reason = f"{cfg.lora.targets} match no module of {source}"
            raise ConfigError(f"lora.targets: {reason}", "lora.targets", reason) from None
        raise
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return LlmParts(peft_model, tokenizer, source, lora_config)

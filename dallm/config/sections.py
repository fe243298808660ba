"""The sections of a job configuration (`[model]`, `[data]`, `[lora]`, ...), each a pydantic model
that refuses unknown keys; `dallm.config.job.JobConfig` puts them together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from dallm.monitor.window import Span, parse_span

# A hub id: `name` or `org/name` (what huggingface_hub accepts as a repo id) in model.base.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


class ConfigError(ValueError):
    """A job configuration that cannot be used; the message is one line naming the key.

    `key` and `reason` hold the message's parts when it is about one key, so that a caller can say
    where the value came from (`--set lora.rank=0`, `--grid ...`) instead of the config file.
    """

    def __init__(self, message: str, key: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.reason = reason


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # "image": a text-to-image diffusion model; "llm": a causal language model (dallm.llm)
    kind: Literal["image", "llm"] = "image"
    # image: "micro" (the shipped miniature model), a hub id, or a local diffusers folder;
    # llm: "micro-llm" (the shipped micro LLM), a hub id, or a local transformers folder
    base: str = "micro"
    quantize: Literal["none", "4bit"] = "none"  # llm: load the base in 4 bits (bitsandbytes, CUDA)
    revision: str | None = None
    variant: str | None = None
    resolution: int | None = Field(default=None, ge=8)  # None: the UNet's sample_size x VAE factor
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the scheduler's own


class DataConfig(_Section):
    dir: Path | None = None
    instance_prompt: str = ""  # used for images without a same-name .txt caption
    caption_ext: str = ".txt"
    limit: int | None = Field(default=None, ge=1)  # use the first N images (sorted by name)
    random_flip: bool = False
    center_crop: bool = True
    min_size: int | None = Field(default=None, ge=1)  # smaller images are bad; None: resolution / 2
    on_bad_image: Literal["error", "skip"] = "error"
    # Prior preservation (DreamBooth): class images keep the model's notion of the class.
    class_dir: Path | None = None
    class_prompt: str = ""
    prior_loss_weight: float = Field(default=1.0, ge=0)
    # LLM jobs (model.kind = "llm"): text files, JSONL (one {"text": ...} per line) or .txt (one
    # text per line). `validation`: held-out target text (ppl_val); without it `val_fraction` of
    # the training texts are held out. `base`: text of the base model's distribution (ppl_base).
    train: list[Path] = Field(default_factory=list)
    validation: list[Path] = Field(default_factory=list)
    val_fraction: float = Field(default=0.0, ge=0, lt=1)
    base: list[Path] = Field(default_factory=list)
    text_key: str = "text"  # the JSONL field holding the text
    max_length: int = Field(default=512, ge=2)  # tokens per text (longer texts are cut)

    @field_validator("train", "validation", "base", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v

    @model_validator(mode="after")
    def _class_prompt_needed(self) -> DataConfig:
        if self.class_dir is not None and not self.class_prompt:
            raise ValueError("class_prompt: required when class_dir is set")
        return self


class LoraConfig(_Section):
    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, gt=0)  # None: alpha = rank (scale 1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    init: Literal["default", "gaussian"] = "default"  # peft's init_lora_weights (B = 0 either way)
    text_encoder: bool = False
    text_encoder_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    text_encoder_rank: int | None = Field(default=None, ge=1)
    # llm: `targets` unset means the attention projections, and the MLP's (gate/up/down) with mlp
    mlp: bool = False


class TokensConfig(_Section):
    """Textual inversion / pivotal tuning: new tokens learned before and with the LoRA."""

    new: list[str] = Field(default_factory=list)  # e.g. ["<s1>", "<s2>"]
    init_word: str | None = None  # None: random rows scaled to the embedding std
    ti_steps: int = Field(default=0, ge=0)  # steps training the embeddings alone, before LoRA joins
    lr: float = Field(default=5e-4, gt=0)

    @field_validator("new")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("tokens must be distinct")
        if any(not t or any(c.isspace() for c in t) for t in v):
            raise ValueError("a token must be non-empty and contain no whitespace")
        return v


class TrainConfig(_Section):
    # "full" fine-tunes every UNet weight (a baseline for comparison); CS / CS-Fluctuation are
    # defined for LoRA only, so a full job runs without the monitor.
    method: Literal["lora", "full"] = "lora"
    ema_decay: float | None = Field(default=None, gt=0, lt=1)  # full: the result is an EMA of the UNet
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    text_encoder_lr: float | None = Field(default=None, gt=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    # torch.compile of the UNet's training forward (static shapes; evaluation and sampling stay
    # eager). The first step compiles (a minute or more at SD 1.5 shape); docs/engine.md.
    compile: bool = False
    # The UNet's weights and its inputs in channels-last memory format (NHWC convolutions).
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v


class MonitorConfig(_Section):
    cs: bool = True  # CS (Eq. 2) every step
    # M of Eqs. 3-4: steps (30), epochs ("2 epochs", {epochs = 2}: the paper's choice) or, as an
    # explicit choice only, a fraction of train.steps ("5%"), which makes the stop follow the budget
    # (dallm.monitor.window). The default is steps, provisionally 30 (the quickstart's 5% of 600):
    # issue 23's experiment (experiments/early_stop.py) sets it. `window_steps(cfg)` resolves it.
    window: Span = 30
    early_stop: Literal["auto", "notify", "off"] = "notify"
    # The turning-point rule (dallm.monitor.csf): "paper" (Algorithm 1 as written: the derivative's second
    # turn from - to +; with a window of 5% it was as close to the best KID as the guard and
    # confirmed sooner, docs/results.md) or "guarded" (hysteresis on log10 CS-Fluctuation: a valley
    # counts when the curve fell and then rose by more than `min_rise` decades around it; valleys
    # closer than `min_valley_distance` steps, default the window, are merged; for small windows).
    rule: Literal["guarded", "paper"] = "paper"
    min_rise: float = Field(default=0.1, ge=0)
    min_valley_distance: int | None = Field(default=None, ge=1)
    # What the job returns: the turning point's weights ("turning"), the evaluated step with the
    # lowest validation KID ("best_val_kid"), or, with early_stop = "auto", training on for
    # `margin` past the turning point's confirmation and returning the best validation KID seen
    # ("turning_then_best"). The KID choices need eval.val_dir and eval.every; without them the
    # job returns the turning point (CS-Fluctuation is the signal when there is no held-out set).
    # "evidence": as "turning_then_best" for when to stop, and the result chosen on the evidence
    # (dallm.monitor.selection: the lowest validation KID on one half of the references among the
    # checkpoints that keep prompt fidelity within `fidelity_margin` of the base's, judged on paired
    # differences, reported on the other half).
    select: Literal["turning", "best_val_kid", "turning_then_best", "evidence"] = "turning_then_best"
    margin: Span = 30  # as `window`; in steps by default, so that the stop does not follow the budget
    # Selection on the evidence (dallm.monitor.selection): a checkpoint is eligible while its prompt
    # fidelity on held-out prompts is at least the base model's minus this (absolute; micro heads
    # and CLIP cosines alike). 0.4 from the out-of-sample experiment (docs/results.md section 3, 11
    # test runs): 0.2 kept shape (0.97) but cost style (0.68) and KID (4/11 within one paired SE of
    # the best); 0.4: 8/11 within, fidelity / shape / style 0.65 / 0.73 / 0.80; no margin met the
    # quickstart's fidelity target on average.
    fidelity_margin: float = Field(default=0.4, ge=0)
    # The detector sees CS only after this step (None: the LoRA's warm-up, the larger of
    # tokens.ti_steps and train.warmup_steps). Before it CS jumps from 0 (LoRA B starts at 0, or
    # is still frozen while the new tokens train) and CS-Fluctuation = Var / lr is inflated by the
    # small warm-up lr: valleys found there are not the turning point (docs/results.md).
    start_step: int | None = Field(default=None, ge=0)
    log_every: int = Field(default=1, ge=1)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Span:
        return parse_span(v, "monitor.window", 2)

    @field_validator("margin", mode="before")
    @classmethod
    def _margin(cls, v: Any) -> Span:
        return 0 if v == 0 and not isinstance(v, bool) else parse_span(v, "monitor.margin", 1)


class CheckpointConfig(_Section):
    every: int = Field(default=250, ge=1)
    keep: int | None = Field(default=3, ge=1)  # None keeps all


class SamplesConfig(_Section):
    every: int = Field(default=0, ge=0)  # 0: off
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    steps: int = Field(default=25, ge=1)
    guidance: float = Field(default=5.0, ge=0)
    thumbnail: int = Field(default=64, ge=8)
    # llm: generated tokens per prompt; temperature 0 is greedy (then `seeds` give one text each)
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0)


VAL_LOSS_TIMESTEPS = (10, 350, 500, 650, 990)  # of 1,000 training timesteps (sd-scripts PR #1856)


class EvalConfig(_Section):
    every: int = Field(default=0, ge=0)  # 0: off (still at the end when val_dir or prompts are set)
    features: str = "micro"  # micro | inception | clip:FOLDER
    prompts: list[str] = Field(default_factory=list)  # empty: the data's captions
    num_images: int = Field(default=20, ge=2)
    val_dir: Path | None = None
    # KID subsets: smaller than the samples, or every subset is the whole set and the spread is 0
    # (None: half of eval.num_images).
    subset_size: int | None = Field(default=None, ge=2)
    num_subsets: int = Field(default=100, ge=1)
    # A KID precision instead of a count: the std of the validation KID (else the training KID)
    # wanted; the first evaluation measures it with num_images samples and picks the count for the
    # rest of the job (docs/evaluation.md), at most max_images. None: num_images throughout.
    kid_std_target: float | None = Field(default=None, gt=0)
    max_images: int = Field(default=200, ge=2)
    steps: int = Field(default=25, ge=1)
    guidance: float = Field(default=5.0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    inception_weights: Path | None = None
    # background: a separate process evaluates copies of the trainable weights while training goes
    # on (the trainer waits only where a policy needs a KID); inline: in the training loop.
    mode: Literal["inline", "background"] = "background"
    threads: int | None = Field(default=None, ge=1)  # background on the CPU; None: the spare cores, >= 1
    # Features of the base model's eval images and of the target folders, shared between jobs under
    # a key of exactly what makes them (None: $DALLM_CACHE, else <dallm home>/cache/eval).
    cache: bool = True
    cache_dir: Path | None = None
    # Issue 23's evidence (library: dallm.eval.val_loss, fidelity, kid_spread; docs/evaluation.md).
    # The validation loss on eval.val_dir: timesteps of a 1,000-step schedule (scaled to the
    # model's; kohya's PR #1856), fixed noise; [] turns it off.
    val_loss_timesteps: list[int] = Field(default_factory=lambda: list(VAL_LOSS_TIMESTEPS))
    fidelity_prompts: int = Field(default=48, ge=0)  # held-out prompts for prompt fidelity; 0: off
    # Who judges prompt fidelity: "micro" (the feature net's heads) or "clip:FOLDER" (a CLIP score);
    # None: micro for the micro model, else eval.features when it is clip:FOLDER (`fidelity_judge`).
    fidelity: str | None = None
    kid_bootstrap: int = Field(default=1000, ge=2)  # replicates for KID's std of the mean and paired diffs

    @field_validator("val_loss_timesteps")
    @classmethod
    def _val_loss_timesteps(cls, v: list[int]) -> list[int]:
        if any(not 0 <= t < 1000 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"{v}: distinct timesteps of a 1,000-step schedule (0-999), e.g. [10, 500, 990]")
        return v

    @field_validator("fidelity")
    @classmethod
    def _fidelity(cls, v: str | None) -> str | None:
        if v is not None and v != "micro" and not (v.startswith("clip:") and len(v) > 5):
            raise ValueError(f"unknown fidelity judge {v!r}; use micro or clip:FOLDER")
        return v

    @field_validator("max_images")
    @classmethod
    def _max_images(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("num_images")
        if n is not None and v < n:
            raise ValueError(f"{v} is below eval.num_images ({n}), the count a precision target starts from")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: str) -> str:
        if v not in ("micro", "inception") and not (v.startswith("clip:") and len(v) > 5):
            raise ValueError(f"unknown feature extractor {v!r}; use micro, inception or clip:FOLDER")
        return v

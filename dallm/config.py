"""Job configuration: a TOML file validated by pydantic, with `--set section.key=value` overrides.

Every error names the key path (`train.lr`) and the reason, in one line.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from dallm.monitor.window import Span, epochs_of, parse_span, span_steps, steps_per_epoch


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
    select: Literal["turning", "best_val_kid", "turning_then_best"] = "turning_then_best"
    margin: Span = 30  # as `window`; in steps by default, so that the stop does not follow the budget
    # Selection on the evidence (dallm.monitor.selection): a checkpoint is eligible while its prompt
    # fidelity on held-out prompts is at least the base model's minus this (absolute; micro heads
    # and CLIP cosines alike). Provisional: issue 23's experiment sets it.
    fidelity_margin: float = Field(default=0.2, ge=0)
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


class JobConfig(_Section):
    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int = 0
    output_dir: Path | None = None  # None: runs/<name>
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        steps = self.train.steps
        if self.model.kind == "llm":
            _llm_consistent(self)
        elif self.data.dir is None:
            raise ValueError("data.dir: required (a folder of target images)")
        elif self.data.train or self.data.validation or self.data.base:
            raise ValueError('data.train: text files are for model.kind = "llm"; images go in data.dir')
        # A window in epochs is known only with the training set (EarlyStop resolves it); a default
        # window longer than a short run is no error: CS-Fluctuation is just never computed.
        window = span_steps(self.monitor.window, steps, 2) if epochs_of(self.monitor.window) is None else 0
        if window > steps and "window" in self.monitor.model_fields_set:
            raise ValueError(f"monitor.window: {self.monitor.window} is larger than train.steps ({steps})")
        start = self.monitor.start_step
        if start is not None and window and start + 3 * window > steps:
            raise ValueError(
                f"monitor.start_step: {start} leaves fewer than 3 windows ({3 * window} steps) "
                f"before train.steps ({steps}); CS-Fluctuation would never be computed"
            )
        sub = self.eval.subset_size
        if sub is not None and sub >= self.eval.num_images:
            raise ValueError(
                f"eval.subset_size: {sub} >= eval.num_images ({self.eval.num_images}): every subset would be "
                f"the whole sample and the KID spread 0; use at most {self.eval.num_images - 1} (unset: half)"
            )
        if self.train.warmup_steps > steps:
            raise ValueError(f"train.warmup_steps: {self.train.warmup_steps} exceeds train.steps ({steps})")
        if self.tokens.ti_steps >= steps and self.tokens.ti_steps > 0:
            raise ValueError(
                f"tokens.ti_steps: {self.tokens.ti_steps} leaves no LoRA steps (train.steps={steps})"
            )
        if self.tokens.ti_steps and not self.tokens.new:
            raise ValueError("tokens.ti_steps: set, but tokens.new lists no tokens")
        if self.samples.every and not self.samples.prompts:
            raise ValueError("samples.prompts: required when samples.every > 0")
        if self.train.method == "full":
            if self.monitor.early_stop == "auto":
                raise ValueError(
                    'monitor.early_stop: "auto" needs CS-Fluctuation, defined only for LoRA; '
                    'use "off" with train.method = "full"'
                )
            if self.lora.text_encoder:
                raise ValueError('lora.text_encoder: LoRA on the text encoder with train.method = "full"')
        elif self.train.ema_decay is not None:
            raise ValueError('train.ema_decay: only for train.method = "full"')
        if self.train.mixed_precision != "no" and self.train.device == "cpu":
            raise ValueError("train.mixed_precision: bf16/fp16 autocast needs a CUDA device")
        return self

    @property
    def out(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name


LLM_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # Llama, Qwen2, Mistral, Gemma names
LLM_MLP = ["gate_proj", "up_proj", "down_proj"]


def _llm_consistent(cfg: JobConfig) -> None:
    """An LLM job names text files and none of the image-only settings."""
    if not cfg.data.train:
        raise ValueError("data.train: required (JSONL or .txt files of training texts)")
    image_only = {
        "data.dir": cfg.data.dir is not None,
        "data.class_dir": cfg.data.class_dir is not None,
        "tokens.new": bool(cfg.tokens.new),
        "lora.text_encoder": cfg.lora.text_encoder,
        "eval.val_dir": cfg.eval.val_dir is not None,
        "train.compile": cfg.train.compile,  # UNet options (dallm.image.trainer)
        "train.channels_last": cfg.train.channels_last,
    }
    for key, used in image_only.items():
        if used:
            raise ValueError(f'{key}: an image setting; not for model.kind = "llm"')
    if cfg.train.method != "lora":
        raise ValueError('train.method: model.kind = "llm" trains LoRA only')
    if "targets" not in cfg.lora.model_fields_set:  # an LLM's names: attention (and MLP) projections
        cfg.lora.targets = LLM_ATTENTION + (LLM_MLP if cfg.lora.mlp else [])
    if cfg.model.quantize == "4bit" and cfg.train.device == "cpu":
        raise ValueError('model.quantize: "4bit" needs a CUDA device (bitsandbytes)')


# ----------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _error_parts(err: ValidationError) -> tuple[str, str]:
    """(key path, reason) of the first error, the count of the others appended to the reason."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    # Model-level validators put the key path at the start of their message.
    where = loc if loc else msg.split(":", 1)[0]
    if not loc and ":" in msg:
        msg = msg.split(":", 1)[1].strip()
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return where, msg + extra


def culprit(key: str, reason: str, overrides: list[str]) -> str | None:
    """The `--set` item that gave `key` its value (else one the reason names), the last one winning."""
    keys = [(item, item.split("=", 1)[0].strip()) for item in reversed(overrides)]
    for item, k in keys:
        if k == key or key.startswith(k + ".") or k.startswith(key + "."):
            return item
    for item, k in keys:
        if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", reason):
            return item
    return None


def key_error(key: str, reason: str, source: str, overrides: list[str] | None = None) -> ConfigError:
    """One line about `key`, saying where its value came from: a `--set` item, else `source`."""
    item = culprit(key, reason, overrides or [])
    if item is None:
        return ConfigError(f"{source}: {key}: {reason}", key, reason)
    where = "" if item.split("=", 1)[0].strip() == key else f"{key}: "
    return ConfigError(f"--set {item}: {where}{reason}", key, reason)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4). The value is read as TOML, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative data paths in a config file are relative to the file's folder."""
    for section, key in (
        ("data", "dir"),
        ("data", "class_dir"),
        ("eval", "val_dir"),
        ("eval", "inception_weights"),
        ("eval", "cache_dir"),
    ):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[section][key] = str((base_dir / value).resolve())
        elif isinstance(value, str):
            data[section][key] = str(Path(value).expanduser())
    texts = data.get("data") if isinstance(data.get("data"), dict) else {}
    for key in ("train", "validation", "base"):  # LLM text files: one path or a list
        value = texts.get(key)
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            texts[key] = [
                str(Path(v).expanduser())
                if Path(v).expanduser().is_absolute()
                else str((base_dir / v).resolve())
                for v in items
            ]
    base = data.get("model", {}).get("base") if isinstance(data.get("model"), dict) else None
    if isinstance(base, str) and (base.startswith(".") or base.startswith("/") or base.startswith("~")):
        data["model"]["base"] = str((base_dir / Path(base).expanduser()).resolve())
    return data


def config_from_dict(
    data: dict[str, Any], source: str = "config", overrides: list[str] | None = None
) -> JobConfig:
    """Validate `data`; an error names the key and `source`, or the `--set` item in `overrides`
    that gave the key its value."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise key_error(*_error_parts(err), source, overrides) from None


def training_set_size(cfg: JobConfig) -> int:
    """The number of training images (data.dir's image files, at most data.limit), for an epoch.

    The job knows the loaded set and passes its size instead (`window_steps(cfg, train_size)`); this
    count is for callers without it. LLM jobs must pass it (their texts are parsed from files)."""
    if cfg.model.kind == "llm" or cfg.data.dir is None:
        raise ConfigError("monitor.window: in epochs, the training set's size is needed", "monitor.window")
    from dallm.image.files import image_files

    try:
        n = len(image_files(cfg.data.dir))
    except OSError as e:
        raise ConfigError(f"data.dir: {cfg.data.dir}: cannot list ({e.strerror})", "data.dir") from None
    return min(n, cfg.data.limit) if cfg.data.limit else n


def epoch_steps(cfg: JobConfig, train_size: int | None = None) -> int:
    """Optimizer steps per epoch: every training item once at train.batch_size x train.grad_accum."""
    n = train_size if train_size is not None else training_set_size(cfg)
    return steps_per_epoch(n, cfg.train.batch_size, cfg.train.grad_accum)


def _span(cfg: JobConfig, span: Span, minimum: int, train_size: int | None) -> int:
    epochs = epoch_steps(cfg, train_size) if epochs_of(span) is not None else None
    return span_steps(span, cfg.train.steps, minimum, epochs)


def window_steps(cfg: JobConfig, train_size: int | None = None) -> int:
    """monitor.window in steps (a fraction is of train.steps; epochs need the training set's size,
    `train_size`, else `training_set_size` counts data.dir)."""
    return _span(cfg, cfg.monitor.window, 2, train_size)


def margin_steps(cfg: JobConfig, train_size: int | None = None) -> int:
    """monitor.margin in steps, as `window_steps`."""
    return _span(cfg, cfg.monitor.margin, 0, train_size)


def fidelity_judge(cfg: JobConfig) -> str | None:
    """What judges prompt fidelity: eval.fidelity, else "micro" for the micro model, else the
    clip:FOLDER of eval.features; None when there is nothing to judge with (or fidelity_prompts = 0)."""
    if cfg.eval.fidelity_prompts == 0 or cfg.model.kind == "llm":
        return None
    if cfg.eval.fidelity is not None:
        return cfg.eval.fidelity
    if cfg.model.base == "micro":
        return "micro"
    return cfg.eval.features if cfg.eval.features.startswith("clip:") else None


def monitor_start(cfg: JobConfig) -> int:
    """The last step the turning-point detector ignores (monitor.start_step, resolved)."""
    if cfg.monitor.start_step is not None:
        return cfg.monitor.start_step
    return max(cfg.tokens.ti_steps, cfg.train.warmup_steps)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    data = resolve_paths(data, path.resolve().parent)
    return config_from_dict(data, str(path), overrides)


def config_to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Plain TOML-able data (None values dropped, paths as strings)."""
    return cfg.model_dump(mode="json", exclude_none=True)


def config_to_toml(cfg: JobConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def save_config(cfg: JobConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(config_to_toml(cfg))
    tmp.replace(path)

"""The whole job configuration (`JobConfig`): its sections, the rules that span several of them, and
the values resolved from it (steps for fractions of train.steps).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from dallm.config.sections import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    MonitorConfig,
    SamplesConfig,
    TokensConfig,
    TrainConfig,
    _Section,
)
from dallm.monitor.window import Span, epochs_of, span_steps, steps_per_epoch


def folder_name(name: str) -> str:
    """A job's name as a folder name: no spaces ("quickstart lr=3e-3" -> "quickstart_lr=3e-3")."""
    return name.replace(" ", "_")


class JobConfig(_Section):
    # Spaces, "=" and "," for a run named by its overrides ("quickstart lr=3e-3", `run_name`).
    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=, -]{0,99}$")
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
        # A window in epochs is known only with the training set (EarlyStop resolves it); the default
        # window longer than a short run is no error: CS-Fluctuation is just never computed. Judged by
        # value, not by "was it set": a config saved whole (job-config.json) and read again sets every key.
        window = span_steps(self.monitor.window, steps, 2) if epochs_of(self.monitor.window) is None else 0
        if window > steps and self.monitor.window != MonitorConfig.model_fields["window"].default:
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
        return self.output_dir if self.output_dir is not None else Path("runs") / folder_name(self.name)


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

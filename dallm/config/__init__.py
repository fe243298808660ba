"""Job configuration: a TOML file validated by pydantic, with `--set section.key=value` overrides.

Every error names the key path (`train.lr`) and the reason, in one line.

- `sections`: one pydantic model per `[section]` (and `ConfigError`);
- `job`: `JobConfig`, the rules across sections, and values resolved from it (`window_steps`, ...);
- `files`: reading, overriding and writing TOML, and the one-line errors.
"""

from dallm.config.files import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    culprit,
    key_error,
    load_config,
    parse_override,
    resolve_paths,
    run_name,
    save_config,
)
from dallm.config.job import (
    LLM_ATTENTION,
    LLM_MLP,
    JobConfig,
    epoch_steps,
    fidelity_judge,
    margin_steps,
    monitor_start,
    training_set_size,
    window_steps,
)
from dallm.config.sections import (
    HUB_ID,
    VAL_LOSS_TIMESTEPS,
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
)

__all__ = [
    "HUB_ID",
    "LLM_ATTENTION",
    "LLM_MLP",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "JobConfig",
    "LoraConfig",
    "ModelConfig",
    "MonitorConfig",
    "SamplesConfig",
    "TokensConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "culprit",
    "key_error",
    "load_config",
    "margin_steps",
    "monitor_start",
    "parse_override",
    "resolve_paths",
    "run_name",
    "save_config",
    "training_set_size",
    "epoch_steps",
    "fidelity_judge",
    "VAL_LOSS_TIMESTEPS",
    "window_steps",
]

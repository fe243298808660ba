"""Where an LLM job's base model comes from (`model.base`: "micro-llm", a local transformers folder or
a hub id), and what loading it in 4 bits needs; the preflight and the model loader share both.
"""

from __future__ import annotations

from pathlib import Path

from dallm.config import HUB_ID, ConfigError

MICRO_LLM = "micro-llm"  # model.base naming the shipped micro LLM


def _err(key: str, reason: str) -> ConfigError:
    return ConfigError(f"{key}: {reason}", key, reason)


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            'model.quantize: "4bit" needs bitsandbytes (pip install bitsandbytes) and a CUDA device',
            "model.quantize",
            "4bit needs bitsandbytes",
        ) from None


def resolve_llm_base(base: str) -> str:
    """ "micro-llm" -> the shipped micro LLM folder; a folder -> its absolute path; else a hub id."""
    if base == MICRO_LLM:
        from dallm.micro_llm import MODEL_DIR

        if not (MODEL_DIR / "config.json").is_file():
            raise _err(
                "model.base", f"the micro LLM {MODEL_DIR} is missing; rebuild it with `dallm micro build-llm`"
            )
        return str(MODEL_DIR)
    path = Path(base).expanduser()
    if (path.is_absolute() or base.startswith((".", "~"))) and path.exists():  # never by the cwd's folders
        if not (path / "config.json").is_file():
            raise _err("model.base", f"{path} is not a transformers model folder (no config.json)")
        return str(path.resolve())
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or not HUB_ID.fullmatch(base):
        raise _err(
            "model.base", f"{base!r} is neither 'micro-llm', an existing folder nor a hub id (org/name)"
        )
    return base

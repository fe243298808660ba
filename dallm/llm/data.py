"""The texts of an LLM job: training targets, held-out targets (ppl_val) and base text (ppl_base).

Files are JSONL (one JSON object per line, the text under `data.text_key`) or plain text (one text
per line; blank lines are skipped). Every error is one line naming the key and the file (and line).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dallm.config import ConfigError, DataConfig, JobConfig

MICRO_LLM = "micro-llm"  # model.base naming the shipped micro LLM


def _err(key: str, reason: str) -> ConfigError:
    return ConfigError(f"{key}: {reason}", key, reason)


@dataclass(frozen=True)
class Texts:
    train: list[str]
    validation: list[str]  # empty: no ppl_val
    base: list[str]  # empty: no ppl_base


def read_texts(path: Path, key: str, text_key: str = "text") -> list[str]:
    """The texts of one file; `key` (e.g. "data.train") names the setting in errors."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise _err(key, f"no such file {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _err(key, f"cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    texts: list[str] = []
    jsonl = Path(path).suffix.lower() in (".jsonl", ".json")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _err(key, f"{path} line {n}: not JSON ({e.msg})") from None
        value = row.get(text_key) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise _err(key, f"{path} line {n}: no non-empty string field {text_key!r}")
        texts.append(value)
    if not texts:
        raise _err(key, f"{path} holds no texts")
    return texts


def _read_all(paths: list[Path], key: str, text_key: str) -> list[str]:
    return [t for p in paths for t in read_texts(p, key, text_key)]


def load_texts(dc: DataConfig, seed: int) -> Texts:
    """Training, validation and base texts; without `data.validation`, a seeded `val_fraction` of
    the training texts is held out (the rest train)."""
    train = _read_all(dc.train, "data.train", dc.text_key)
    validation = _read_all(dc.validation, "data.validation", dc.text_key)
    if not validation and dc.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = round(dc.val_fraction * len(train))
        if n_val < 1 or n_val >= len(train):
            raise _err(
                "data.val_fraction",
                f"{dc.val_fraction} of {len(train)} texts leaves {n_val} for validation and "
                f"{len(train) - n_val} for training (need at least 1 each)",
            )
        held = set(order[:n_val])
        validation = [train[i] for i in sorted(held)]
        train = [t for i, t in enumerate(train) if i not in held]
    return Texts(train, validation, _read_all(dc.base, "data.base", dc.text_key))


def resolve_llm_base(base: str) -> str:
    """ "micro-llm" -> the shipped micro LLM folder; a folder -> its absolute path; else a hub id."""
    from dallm.preflight import HUB_ID

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


def preflight_llm(cfg: JobConfig) -> None:
    """ConfigError (one line) when an LLM job could not start: its model or its texts."""
    resolve_llm_base(cfg.model.base)
    load_texts(cfg.data, cfg.seed)
    if cfg.model.quantize == "4bit":
        from dallm.llm.model import require_bitsandbytes

        require_bitsandbytes()

"""Job configuration files: TOML read and written, `--set section.key=value` overrides, relative paths,
and errors that name the key path and where its value came from, in one line.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from dallm.config.job import JobConfig
from dallm.config.sections import ConfigError


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


_NAME_VALUE = re.compile(r"^[A-Za-z0-9._,-]{1,24}$")


def run_name(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    """`cfg` named after its `--set` items ("quickstart lr=3e-3": each key's last part and its
    value), so two runs of one config tell apart in `dallm ls` and the TUI; unless an item names it.
    Values a name cannot hold (paths, lists) are left out, and the name kept within its 100 characters."""
    items = [parse_override(o) for o in overrides]
    if not items or any(keys == ["name"] for keys, _ in items):
        return cfg
    parts = [cfg.name]
    for item in overrides:
        key, _, value = item.partition("=")
        short = f"{key.strip().rsplit('.', 1)[-1]}={value.strip()}"
        if _NAME_VALUE.match(value.strip()) and len(" ".join([*parts, short])) <= 100:
            parts.append(short)
    return cfg.model_copy(update={"name": " ".join(parts)})


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

"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `checkpoints/step-000250/` holding
- `pytorch_lora_weights.safetensors` (and `<name>_emb.safetensors`): the weights in the exported
  format, so `dallm export OUT --step 250` and `load_lora_weights` work on it directly;
- `metrics.jsonl`: the job's metric rows up to this step, so a resume from here after a rollback to
  an earlier step restores this history (see `dallm.engine.metrics_log`);
- `state.pt`: the raw peft LoRA tensors, token rows, optimizer, LR scheduler, grad scaler, the RNG
  states (python, numpy, torch, cuda, the training noise generator), the step, the CS history and
  the in-memory weight snapshots the turning-point detector may still need.

The folder is written as `.tmp-step-000250` and renamed into place, so a crash never leaves a half
checkpoint; `keep` bounds how many stay on disk.

`state.pt` is read with `torch.load(weights_only=True)`: a checkpoint folder can come from anyone
who can write to an output folder, and a full unpickler would run their code. So `state.pt` holds
only tensors and plain data; the few richer objects (TrainState snapshots, numpy RNG arrays) are
written as tagged dicts by `_to_plain` and rebuilt by `_from_plain`.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dallm.protocol.files import checkpoint_folders

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """The trainable state at one step. Snapshots kept for the result may omit the optimizer part."""

    step: int
    # The model's LoRA tensors (peft keys): the UNet's for an image job, the LLM's for an LLM job;
    # with train.method = "full", the whole UNet's state dict.
    lora: dict[str, torch.Tensor]
    text_encoder_lora: dict[str, torch.Tensor] | None = None
    token_rows: torch.Tensor | None = None
    optimizer: dict[str, Any] | None = None
    lr_scheduler: dict[str, Any] | None = None
    grad_scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # history, snapshots (checkpoints only)

    def weights_only(self) -> TrainState:
        return TrainState(self.step, self.lora, self.text_encoder_lora, self.token_rows)

    def copied(self) -> TrainState:
        """Real copies of the weights, on the CPU; the optimizer part (when kept) is shared, not copied:
        a snapshot hands out fresh weights to load, and nothing writes into its optimizer state."""

        def cp(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.detach().to("cpu", copy=True) for k, v in d.items()}

        rows = self.token_rows.detach().to("cpu", copy=True) if self.token_rows is not None else None
        out = TrainState(self.step, cp(self.lora) or {}, cp(self.text_encoder_lora), rows)
        out.optimizer, out.lr_scheduler, out.grad_scaler, out.rng = (
            self.optimizer,
            self.lr_scheduler,
            self.grad_scaler,
            self.rng,
        )
        return out

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None and self.rng is not None


def deep_copy_state(obj: Any) -> Any:
    """A real copy (tensors cloned to the CPU) of nested dicts/lists of tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: deep_copy_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(deep_copy_state(v) for v in obj)
    return copy.deepcopy(obj)


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_TRAIN_STATE = "__dallm_train_state__"
_NDARRAY = "__dallm_ndarray__"


def _to_plain(obj: Any, where: str = "state") -> Any:
    """`obj` as tensors, numbers, strings, None, lists, tuples and dicts only (weights_only-loadable)."""
    if isinstance(obj, TrainState):
        return {_TRAIN_STATE: _to_plain(dict(obj.__dict__), where)}
    if isinstance(obj, np.ndarray):
        return {
            _NDARRAY: torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64)),
            "dtype": str(obj.dtype),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if obj is None or isinstance(obj, torch.Tensor | bool | int | float | str | torch.dtype):
        return obj
    raise TypeError(f"checkpoint: {where} is a {type(obj).__name__}, which state.pt cannot hold")


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _TRAIN_STATE in obj:
            return _train_state(_from_plain(obj[_TRAIN_STATE]))
        if _NDARRAY in obj:
            return obj[_NDARRAY].numpy().astype(obj["dtype"])
        return {k: _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_from_plain(v) for v in obj)
    return obj


def _train_state(fields: dict[str, Any]) -> TrainState:
    if "unet_lora" in fields:  # written before TrainState.lora had its kind-neutral name
        fields["lora"] = fields.pop("unet_lora")
    return TrainState(**fields)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: Path, state: TrainState, files: dict[str, Any] | None = None) -> Path:
    """Write `state` (and `files`: name -> callable(folder) writing it) as root/step-N atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{checkpoint_name(state.step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for writer in (files or {}).values():
        writer(tmp)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(_to_plain(dict(state.__dict__)), f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-checkpointing the same step (e.g. after a rollback): replace it
        old = root / f".old-{checkpoint_name(state.step)}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def load_checkpoint(folder: Path) -> TrainState:
    """The state of a checkpoint folder; never runs code from the file (weights_only unpickling)."""
    path = Path(folder) / STATE_FILE
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a dallm checkpoint state (refused to unpickle: {first})") from None
    if not isinstance(data, dict) or "step" not in data or not ({"lora", "unet_lora"} & data.keys()):
        raise ValueError(f"{path}: not a dallm checkpoint state")
    return _train_state(_from_plain(data))


def prune_checkpoints(root: Path, keep: int | None, protect: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """Delete the oldest checkpoints beyond `keep` (never those in `protect`); returns the deleted steps."""
    if keep is None:
        return []
    ckpts = checkpoint_folders(root)
    deleted = []
    for step, path in ckpts[: max(0, len(ckpts) - keep)]:
        if step in protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(step)
    return deleted


def find_checkpoint(path: Path, step: int | None = None) -> Path:
    """A checkpoint folder from an output folder (latest, or `step`) or a checkpoint folder itself."""
    path = Path(path)
    if (path / STATE_FILE).is_file() and step is None:
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpts = dict(checkpoint_folders(root))
    if not ckpts:
        raise FileNotFoundError(f"{path}: no checkpoints found")
    if step is None:
        return ckpts[max(ckpts)]
    if step not in ckpts:
        raise FileNotFoundError(
            f"{path}: no checkpoint at step {step} (have {', '.join(map(str, sorted(ckpts)))})"
        )
    return ckpts[step]

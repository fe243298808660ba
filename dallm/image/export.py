"""Writing the result: LoRA weights in diffusers/peft format or kohya format, token embeddings.

- diffusers: `pytorch_lora_weights.safetensors` with keys `unet.<module>.lora_A.weight` /
  `.lora_B.weight` (and `text_encoder.` ones), loadable with `pipeline.load_lora_weights(folder)`.
  The LoRA scale alpha/rank is folded into lora_B, so the file needs no alpha metadata.
- kohya: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (`lora_te_...` for the text encoder), for A1111 / ComfyUI. Trained tokens go into the same file
  as a bundled embedding, `bundle_emb.<s1><s2>.string_to_param.*` (n_tokens, dim): A1111 / Forge
  load it with the LoRA and the prompt names it by the joined tokens, as in training. Loaders that
  ignore bundles (ComfyUI) or refuse the file with them (diffusers' `load_lora_weights` wants every
  key to be a LoRA key) use the sibling `<file>_emb.safetensors` (`KOHYA_USAGE`).
- tokens: `<name>_emb.safetensors` with key `clip_l` (n_tokens, dim), loadable with
  `pipeline.load_textual_inversion(state["clip_l"], token=[...])`; the token strings are stored in
  the file's metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LORA_FILE = "pytorch_lora_weights.safetensors"
BUNDLE = "bundle_emb."  # A1111's prefix of an embedding bundled in a LoRA file
KOHYA_USAGE = """\
{lora}: the LoRA with the tokens {trigger} bundled (A1111 / Forge: write {trigger} in the prompt)
{emb}: the tokens alone (ComfyUI: models/embeddings); in diffusers:
  import safetensors.torch
  sd = safetensors.torch.load_file({lora!r})
  pipe.load_lora_weights({{k: v for k, v in sd.items() if not k.startswith({bundle!r})}})
  pipe.load_textual_inversion(safetensors.torch.load_file({emb!r})["clip_l"], token={tokens})"""


def emb_file_name(name: str) -> str:
    return f"{name}_emb.safetensors"


def _atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def bake_scale(lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold the LoRA scale into lora_B so that the weights mean the same thing at scale 1."""
    if scale == 1.0:
        return dict(lora)
    return {k: (v * scale if ".lora_B." in k else v) for k, v in lora.items()}


def diffusers_lora_dict(
    unet_lora: dict[str, torch.Tensor],
    text_encoder_lora: dict[str, torch.Tensor] | None = None,
    unet_scale: float = 1.0,
    text_encoder_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """peft-format LoRA tensors of the UNet (and text encoder) -> the prefixed file dict."""
    out = {f"unet.{k}": v for k, v in bake_scale(unet_lora, unet_scale).items()}
    if text_encoder_lora:
        out.update(
            {f"text_encoder.{k}": v for k, v in bake_scale(text_encoder_lora, text_encoder_scale).items()}
        )
    return out


def save_lora(folder: Path, lora: dict[str, torch.Tensor]) -> Path:
    path = Path(folder) / LORA_FILE
    _atomic_save(lora, path, metadata={"format": "pt"})
    return path


def save_embeddings(path: Path, rows: torch.Tensor, tokens: list[str]) -> Path:
    _atomic_save({"clip_l": rows.float()}, path, metadata={"format": "pt", "tokens": json.dumps(tokens)})
    return path


def load_embeddings(path: Path) -> tuple[torch.Tensor, list[str]]:
    with safe_open(str(path), framework="pt") as f:
        tokens = json.loads((f.metadata() or {}).get("tokens", "[]"))
        return f.get_tensor("clip_l"), tokens


def to_kohya(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our diffusers/peft file dict -> kohya keys (scale already folded in, so alpha = rank)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in lora.items():
        prefix, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)  # "down_blocks...to_q", "A.weight"
        if prefix == "unet":
            head = "lora_unet_"
        elif prefix == "text_encoder":
            head = "lora_te_"
            if not module.startswith("text_model."):
                module = "text_model." + module  # kohya/A1111 name CLIP's modules from text_model
        else:
            raise ValueError(f"unexpected LoRA key {key!r}")
        name = head + module.replace(".", "_")
        direction = {"A.weight": "lora_down", "B.weight": "lora_up"}[kind]
        out[f"{name}.{direction}.weight"] = value
        if direction == "lora_down":
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def kohya_emb_path(path: Path) -> Path:
    """The sibling token file of a kohya export."""
    return path.with_name(f"{path.stem}_emb.safetensors")


def _bundle(rows: torch.Tensor, tokens: list[str]) -> dict[str, torch.Tensor]:
    """A1111's bundled embedding: named by the tokens as a prompt writes them, one row per token."""
    return {f"{BUNDLE}{''.join(tokens)}.string_to_param.*": rows.float()}


def kohya_usage(path: Path) -> str | None:
    """How to load a kohya export and its tokens (None when it bundles none)."""
    with safe_open(str(path), framework="pt") as f:
        if not any(k.startswith(BUNDLE) for k in f.keys()):  # noqa: SIM118 - safe_open has no __iter__
            return None
    emb = kohya_emb_path(path)
    _, tokens = load_embeddings(emb)
    return KOHYA_USAGE.format(
        lora=str(path), emb=str(emb), trigger="".join(tokens), bundle=BUNDLE, tokens=tokens
    )


def export_lora(src_dir: Path, fmt: str, out: Path) -> Path:
    """Export the LoRA in `src_dir` (an output or checkpoint folder) as diffusers or kohya.

    diffusers: `out` is a folder (the file inside is named as pipelines expect); kohya: `out` is a
    .safetensors file (a folder gets `<folder name>.safetensors` inside it), with the tokens bundled
    and in the sibling `kohya_emb_path(out)`.
    """
    src = Path(src_dir) / LORA_FILE
    if not src.is_file():
        raise FileNotFoundError(f"{src_dir}: no {LORA_FILE} in this folder")
    lora = load_file(str(src))
    out = Path(out)
    if fmt == "diffusers":
        target = out if out.suffix != ".safetensors" else out.parent
        path = save_lora(target, lora)
        for emb in Path(src_dir).glob("*_emb.safetensors"):
            rows, tokens = load_embeddings(emb)
            save_embeddings(target / emb.name, rows, tokens)
        return path
    if fmt == "kohya":
        path = out if out.suffix == ".safetensors" else out / f"{Path(src_dir).resolve().name}.safetensors"
        tensors = to_kohya(lora)
        embs = sorted(Path(src_dir).glob("*_emb.safetensors"))
        if len(embs) > 1:
            raise ValueError(f"{src_dir}: more than one token file ({', '.join(e.name for e in embs)})")
        if embs:
            rows, tokens = load_embeddings(embs[0])
            if not tokens:
                raise ValueError(f"{embs[0]}: no token strings in its metadata")
            tensors |= _bundle(rows, tokens)
            save_embeddings(kohya_emb_path(path), rows, tokens)
        _atomic_save(tensors, path, metadata={"format": "pt", "ss_network_module": "networks.lora"})
        return path
    raise ValueError(f"unknown export format {fmt!r}; use diffusers or kohya")

"""The micro world: a miniature pretrained text-to-image model, its teacher, and its KID feature net.

- `MODEL_DIR`: the shipped model, a diffusers StableDiffusionPipeline folder (32x32 images).
- `load_feature_net(device)`: the feature CNN (eval mode); images [N,3,H,W] in [0,1] -> [N, feature_dim].
- `dallm.micro.world` (scenes, captions), `dallm.micro.teacher` (the "baroque" renderer),
  `dallm.micro.build` (rebuilds everything: `dallm micro build`).

Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL_DIR: Path = HERE / "model"
FEATNET_PATH: Path = HERE / "featnet.safetensors"
MANIFEST_PATH: Path = HERE / "MANIFEST.json"


class _Dim(int):
    """An int that can also be called (`feature_dim` and `feature_dim()` both give the width)."""

    def __call__(self) -> int:
        return int(self)


feature_dim = _Dim(128)  # must match featnet.FEATURE_DIM and the shipped featnet.json


def load_feature_net(device: Any = "cpu", path: Path | str | None = None) -> Any:
    """The shipped feature net as a torch module in eval mode (no gradients)."""
    from dallm.micro import featnet

    return featnet.load(Path(path) if path is not None else FEATNET_PATH, device)


__all__ = ["MODEL_DIR", "FEATNET_PATH", "MANIFEST_PATH", "feature_dim", "load_feature_net"]

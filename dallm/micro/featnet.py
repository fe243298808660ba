"""The feature net: a small CNN trained on world and teacher images to predict their attributes.

Heads: shape (3), foreground colour (6), background colour (6), style (plain / baroque). Its
penultimate layer (after ReLU, `feature_dim` values) gives the "micro" KID features. Input:
float images [N, 3, H, W] in [0, 1] at any size (resized inside to 32x32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dallm.micro.world import COLOUR_NAMES, SHAPES, SIZE, STYLES

FEATURE_DIM = 128
HEADS = {"shape": len(SHAPES), "fg": len(COLOUR_NAMES), "bg": len(COLOUR_NAMES), "style": len(STYLES)}


class FeatureNet(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, size: int = SIZE) -> None:
        super().__init__()
        self.size = size
        self.feature_dim = feature_dim
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)
            )

        self.body = nn.Sequential(
            block(3, w, 1),
            block(w, w, 2),  # 16
            block(w, 2 * w, 1),
            block(2 * w, 2 * w, 2),  # 8
            block(2 * w, 4 * w, 1),
            block(4 * w, 4 * w, 2),  # 4
        )
        # Mean and max pooling plus the (coarse) layout: 4*w*2 + 4*w*4 inputs to the embedding.
        self.embed = nn.Sequential(nn.Linear(4 * w * 2 + 4 * w * 4, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})
        # Set after training so that the mean squared feature is 1 on the training images (KID's
        # cubic kernel (x.y/d + 1)^3 then sees values of order one); the heads read unscaled features.
        self.register_buffer("feature_scale", torch.ones(()))

    def config(self) -> dict:
        return {"width": self.body[0][0].out_channels, "feature_dim": self.feature_dim, "size": self.size}

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - 0.5) / 0.25

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self._prep(x))
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3)), F.adaptive_avg_pool2d(h, 2).flatten(1)], 1)
        return self.embed(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, feature_dim] (scaled by `feature_scale`)."""
        return self.features(x) * self.feature_scale

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.argmax(1) for k, v in self.logits(x).items()}


def save(net: FeatureNet, path: Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path))
    cfg = {
        **net.config(),
        "heads": HEADS,
        "shapes": list(SHAPES),
        "colours": list(COLOUR_NAMES),
        "styles": list(STYLES),
    }
    path.with_suffix(".json").write_text(json.dumps(cfg, indent=2) + "\n")


def load(path: Path, device: str | torch.device = "cpu") -> FeatureNet:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads(path.with_suffix(".json").read_text())
    net = FeatureNet(width=cfg["width"], feature_dim=cfg["feature_dim"], size=cfg["size"])
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval().requires_grad_(False)

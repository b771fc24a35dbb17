"""Perceptual (VGG16 feature) loss from LOCAL weights only.

No pretrained VGG can be downloaded here, so the loss takes a path to a torchvision-layout VGG16 state dict
(``features.{i}.weight`` / ``.bias``; ``classifier.*`` is ignored). Optionally the LPIPS linear heads
(``lin{k}.model.1.weight``, as shipped by the lpips package) weight the five feature levels; without them every
channel weighs the same. Without any weights path the term is simply off (see ``LossConfig.perceptual_weights``).
The network is frozen, fp32, replicated on every rank and outside the DeepSpeed engine.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

# torchvision vgg16 "features": conv widths, "M" = max-pool. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices of the ReLU after each tapped conv in `features`
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def vgg16_features() -> nn.Sequential:
    layers, cin = [], 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str | Path, lpips_heads: str | Path | None = None):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights not found: {path} (set loss.perceptual_weights=null to disable)")
        self.features = vgg16_features()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        self.features.load_state_dict(sd, strict=True)
        widths = [64, 128, 256, 512, 512]
        self.heads = nn.ParameterList([nn.Parameter(torch.ones(w) / w, requires_grad=False) for w in widths])
        if lpips_heads is not None:
            heads = torch.load(lpips_heads, map_location="cpu", weights_only=True)
            for k in range(5):
                self.heads[k].data.copy_(heads[f"lin{k}.model.1.weight"].flatten())
        self.register_buffer("shift", _SHIFT.clone())
        self.register_buffer("scale", _SCALE.clone())
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x):
        x = (x.float() - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
            if i == _TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the LPIPS-style distance between images in [-1, 1]."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            total = 0.0
            for fx, fy, w in zip(self._taps(x), self._taps(y), self.heads):
                nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = (nx - ny).pow(2) * w.view(1, -1, 1, 1)
                total = total + d.sum(1).mean()
            return total

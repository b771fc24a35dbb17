"""Image transforms for the tokenizer input: RGB, cover-resize, crop, [-1, 1] tensor."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white (stamps / clip-art are cut-outs on transparent backgrounds)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        base = Image.new("RGB", img.size, (255, 255, 255))
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def cover_size(w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    """Smallest (w', h') with the aspect of (w, h) that covers ``size`` = (H, W)."""
    H, W = size
    scale = max(W / w, H / h)
    return max(W, math.ceil(w * scale - 1e-6)), max(H, math.ceil(h * scale - 1e-6))


def image_to_tensor(img: Image.Image, size: tuple[int, int] = (256, 256), train: bool = False,
                    rng: random.Random | None = None) -> torch.Tensor:
    """PIL image -> FloatTensor[3, H, W] in [-1, 1].

    Resize keeping the aspect ratio so the image covers (H, W), then crop: centred, or at a random offset drawn
    from ``rng`` when ``train`` (no ``rng`` -> centred; global RNGs are never touched).
    """
    img = to_rgb(img)
    H, W = size
    nw, nh = cover_size(img.width, img.height, size)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if train and rng is not None:
        left, top = rng.randint(0, nw - W), rng.randint(0, nh - H)
    else:
        left, top = (nw - W) // 2, (nh - H) // 2
    if (left, top, nw, nh) != (0, 0, W, H):
        img = img.crop((left, top, left + W, top + H))
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """Inverse of :func:`image_to_tensor` (for previews and reconstruction dumps)."""
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)

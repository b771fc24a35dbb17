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


def image_to_uint8(img: Image.Image, size: tuple[int, int] = (256, 256), train: bool = False,
                   rng: random.Random | None = None) -> torch.Tensor:
    """PIL image -> ByteTensor[3, H, W]: what the training pipeline collates (4x fewer bytes than floats through
    worker queues, pinned memory and the host-to-device copy; :func:`to_unit_range` finishes on the device).

    The image is scaled, keeping its aspect ratio, to the smallest size that covers (H, W), then cropped: centred,
    or at a random offset drawn from ``rng`` when ``train`` (no ``rng`` -> centred; global RNGs are never touched).
    Only the source region under the crop is resampled (``resize(box=...)``), never the part the crop throws away.
    """
    img = to_rgb(img)
    H, W = size
    nw, nh = cover_size(img.width, img.height, size)
    if train and rng is not None:
        left, top = rng.randint(0, nw - W), rng.randint(0, nh - H)
    else:
        left, top = (nw - W) // 2, (nh - H) // 2
    if (nw, nh) != img.size:
        sx, sy = img.width / nw, img.height / nh
        box = (left * sx, top * sy, (left + W) * sx, (top + H) * sy)
        img = img.resize((W, H), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    elif (left, top, nw, nh) != (0, 0, W, H):
        img = img.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # a view: collate's stack copies once


def to_unit_range(t: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]; a floating tensor is taken as already normalised."""
    if t.dtype == torch.uint8:
        return t.float().div_(127.5).sub_(1.0)
    return t


def image_to_tensor(img: Image.Image, size: tuple[int, int] = (256, 256), train: bool = False,
                    rng: random.Random | None = None) -> torch.Tensor:
    """PIL image -> FloatTensor[3, H, W] in [-1, 1] (:func:`image_to_uint8`, then :func:`to_unit_range`)."""
    return to_unit_range(image_to_uint8(img, size, train, rng))


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """Inverse of :func:`image_to_tensor` (for previews and reconstruction dumps)."""
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)

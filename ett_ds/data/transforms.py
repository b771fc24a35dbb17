"""Image transforms for the tokenizer input: RGB, fitting to the training size, [-1, 1] tensor.

Every place that fits an image to the training size (the training loader, ``ett_ds.evaluate``, ``ett_ds.infer``)
goes through :func:`fit_image`, which follows ``data.resize_mode`` (:data:`RESIZE_MODES`):

- ``crop`` (default): scale, keeping the aspect ratio, to the smallest size that covers (H, W), then cut the (H, W)
  box out: centred, or at a random offset in training. Whatever lies outside the box is lost.
- ``pad``: letterbox. Scale, keeping the aspect ratio, to the largest size that fits inside (H, W) and centre it on
  a canvas of :data:`PAD_FILL` (mid grey, which is ~0 in the model's [-1, 1] range). Nothing is lost; the borders
  carry no information.
- ``stretch``: resize straight to (H, W). Nothing is lost; shapes are distorted by the ratio of the aspect ratios.

When an input's aspect ratio differs from the training size's by more than :data:`ASPECT_TOLERANCE`, one warning
line goes to stderr, once per process (training: once per loader worker).
"""
from __future__ import annotations

import math
import random
import sys

import numpy as np
import torch
from PIL import Image

from ..config import RESIZE_MODES  # noqa: F401 (the modes fit_image does; re-exported)
from .format import to_rgb


def cover_size(w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    """Smallest (w', h') with the aspect of (w, h) that covers ``size`` = (H, W)."""
    H, W = size
    scale = max(W / w, H / h)
    return max(W, math.ceil(w * scale - 1e-6)), max(H, math.ceil(h * scale - 1e-6))


PAD_FILL = (128, 128, 128)  # letterbox fill of resize_mode=pad: mid grey, (128 / 127.5 - 1) ~ 0 in [-1, 1]
ASPECT_TOLERANCE = 0.10  # relative aspect-ratio difference above which fit_image warns (once per process)

_aspect_warned = False


def contain_size(w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    """Largest (w', h') with (about) the aspect of (w, h) that fits inside ``size`` = (H, W); each side >= 1."""
    H, W = size
    scale = min(W / w, H / h)
    return min(W, max(1, round(w * scale))), min(H, max(1, round(h * scale)))


def decode_size_for(w: int, h: int, size: tuple[int, int], mode: str = "crop") -> tuple[int, int]:
    """(w', h') a reduced-scale JPEG decode (``Image.draft``) of a w x h image must still cover for ``mode``."""
    if mode == "pad":
        return contain_size(w, h, size)
    if mode == "stretch":
        return size[1], size[0]
    return cover_size(w, h, size)


def aspect_difference(w: int, h: int, size: tuple[int, int]) -> float:
    """Relative difference of the aspect ratios of a w x h image and ``size`` = (H, W): max(a/b, b/a) - 1."""
    a, b = w / h, size[1] / size[0]
    return max(a / b, b / a) - 1.0


def reset_aspect_warning() -> None:
    """Let the next mismatched input warn again (the warning is otherwise printed once per process)."""
    global _aspect_warned
    _aspect_warned = False


def _warn_aspect(w: int, h: int, size: tuple[int, int], mode: str) -> None:
    global _aspect_warned
    if _aspect_warned or aspect_difference(w, h, size) <= ASPECT_TOLERANCE:
        return
    _aspect_warned = True
    H, W = size
    effect = {"crop": "crop cuts off what lies outside the centred box (try data.resize_mode=pad or stretch)",
              "pad": "pad adds borders", "stretch": "stretch distorts shapes"}[mode]
    print(f"warning: input image {w}x{h} (aspect {w / h:.2f}) differs from the training size {W}x{H} "
          f"(aspect {W / H:.2f}) by more than {ASPECT_TOLERANCE:.0%}; data.resize_mode={effect} "
          f"(warned once per process)", file=sys.stderr, flush=True)


def fit_image(img: Image.Image, size: tuple[int, int] = (256, 256), mode: str = "crop", train: bool = False,
              rng: random.Random | None = None) -> Image.Image:
    """RGB PIL image of exactly ``size`` = (H, W), fitted by ``mode`` (see the module docstring).

    ``crop`` draws its offset from ``rng`` when ``train`` (no ``rng`` -> centred; global RNGs are never touched);
    ``pad`` and ``stretch`` are deterministic. Each mode resamples the source once, and ``crop`` only the source
    region under the box (``resize(box=...)``), never the part the crop throws away.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode '{mode}' is not one of {', '.join(RESIZE_MODES)}")
    img = to_rgb(img)
    H, W = size
    _warn_aspect(img.width, img.height, size, mode)
    if img.size == (W, H):
        return img
    if mode == "stretch":
        return img.resize((W, H), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "pad":
        nw, nh = contain_size(img.width, img.height, size)
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        canvas = Image.new("RGB", (W, H), PAD_FILL)
        canvas.paste(img, ((W - nw) // 2, (H - nh) // 2))
        return canvas
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
    return img


def image_to_uint8(img: Image.Image, size: tuple[int, int] = (256, 256), train: bool = False,
                   rng: random.Random | None = None, mode: str = "crop") -> torch.Tensor:
    """PIL image -> ByteTensor[3, H, W]: what the training pipeline collates (4x fewer bytes than floats through
    worker queues, pinned memory and the host-to-device copy; :func:`to_unit_range` finishes on the device).
    The image is fitted to ``size`` by :func:`fit_image` with ``mode`` (``data.resize_mode``)."""
    img = fit_image(img, size, mode, train, rng)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # a view: collate's stack copies once


def to_unit_range(t: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]; a floating tensor is taken as already normalised."""
    if t.dtype == torch.uint8:
        return t.float().div_(127.5).sub_(1.0)
    return t


def image_to_tensor(img: Image.Image, size: tuple[int, int] = (256, 256), train: bool = False,
                    rng: random.Random | None = None, mode: str = "crop") -> torch.Tensor:
    """PIL image -> FloatTensor[3, H, W] in [-1, 1] (:func:`image_to_uint8`, then :func:`to_unit_range`)."""
    return to_unit_range(image_to_uint8(img, size, train, rng, mode))


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """Inverse of :func:`image_to_tensor` (for previews and reconstruction dumps)."""
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)

"""A pretrained text reader for scoring images: RapidOCR (PP-OCRv4 ONNX models shipped inside the wheel).

``rapidocr-onnxruntime==1.4.4`` is pinned because it bundles its models and runs offline; the later ``rapidocr``
2.x/3.x packages download them. The dependency is optional: ``available()`` says whether it imports, and
``OCRReader`` raises ``OCRUnavailable`` (with the install command) when it does not.

Two settings differ from RapidOCR's defaults, both measured on rendered text and ``skimage.data.page()``:
* the detector's resize rule is ``det_limit_type="max", det_limit_side_len=960`` (only shrink images whose long
  side exceeds 960) instead of "scale the *short* side up to 736", which turned a 64x512 strip into 736x5888 and
  took seconds per image; with the max rule a text strip reads in tens of milliseconds;
* images shorter than ``upscale_to`` px (default 96) are enlarged bicubically first, since text in a 32x128
  reconstruction is about 10 px tall, below what the detector was trained on.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
from PIL import Image

from ..commandline import UserError

INSTALL_HINT = "pip install rapidocr-onnxruntime==1.4.4"


class OCRUnavailable(UserError, RuntimeError):
    """RapidOCR is not installed (or failed to import)."""


def available() -> bool:
    """True when ``rapidocr_onnxruntime`` can be imported (checked without importing onnxruntime/opencv)."""
    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


@functools.lru_cache(maxsize=None)
def _engine(num_threads: int, det_limit_type: str, det_limit_side_len: int):
    """One RapidOCR engine per process and configuration (loading the three ONNX sessions takes ~0.3-1 s)."""
    try:
        from rapidocr_onnxruntime import RapidOCR  # reason: the optional extra (OCRUnavailable when absent)
    except ImportError as e:
        raise OCRUnavailable(f"RapidOCR is not installed ({e}); install it with: {INSTALL_HINT}") from e
    return RapidOCR(intra_op_num_threads=num_threads, inter_op_num_threads=1,
                    det_limit_type=det_limit_type, det_limit_side_len=det_limit_side_len)


def _box_span(box) -> tuple[float, float, float]:
    """(top, bottom, left) of a 4-point box."""
    pts = np.asarray(box, dtype=np.float64).reshape(-1, 2)
    return pts[:, 1].min(), pts[:, 1].max(), pts[:, 0].min()


def join_lines(results) -> str:
    """Join RapidOCR detections ``[[box, text, score], ...]`` into one string in reading order.

    Boxes are grouped into lines (a box joins the current line when its vertical centre lies inside the line's
    span), lines go top to bottom, boxes within a line left to right; everything is joined with single spaces.
    """
    items = []
    for box, text, *_ in results or []:
        top, bottom, left = _box_span(box)
        items.append((top, bottom, left, str(text).strip()))
    items.sort(key=lambda it: (it[0] + it[1]) / 2)
    lines: list[list] = []
    for it in items:
        centre = (it[0] + it[1]) / 2
        if lines and lines[-1][0] <= centre <= lines[-1][1]:
            line = lines[-1]
            line[0], line[1] = min(line[0], it[0]), max(line[1], it[1])
            line[2].append(it)
        else:
            lines.append([it[0], it[1], [it]])
    words = [it[3] for _, _, line in lines for it in sorted(line, key=lambda it: it[2])]
    return " ".join(w for w in " ".join(words).split())


class OCRReader:
    """``read(img)`` -> the text RapidOCR finds in an RGB uint8 image (H, W, 3) or a grayscale one (H, W).

    ``num_threads`` (onnxruntime intra-op threads) defaults to ``$OMP_NUM_THREADS`` or 1, so several ranks on one
    host do not oversubscribe the CPU. ``upscale_to``: see the module docstring; 0 disables it.
    """

    def __init__(self, num_threads: int | None = None, upscale_to: int = 96, max_side: int = 960,
                 det_limit_type: str = "max", det_limit_side_len: int = 960):
        if num_threads is None:
            num_threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        self.upscale_to, self.max_side = upscale_to, max_side
        self._engine = _engine(max(1, num_threads), det_limit_type, det_limit_side_len)

    def _prepare(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise TypeError(f"OCRReader.read expects uint8 pixels, got {img.dtype} (see metrics.to_uint8_images)")
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise ValueError(f"OCRReader.read expects HxW, HxWx3 or HxWx4, got {img.shape}")
        img = img[:, :, :3]
        h, w = img.shape[:2]
        if self.upscale_to and h < self.upscale_to:
            s = min(self.upscale_to / h, self.max_side / max(h, w))
            if s > 1:
                img = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))
        return np.ascontiguousarray(img[:, :, ::-1])  # RapidOCR treats a 3-channel array as BGR

    def read(self, img: np.ndarray) -> str:
        results, _ = self._engine(self._prepare(img))
        return join_lines(results)

    def read_many(self, images) -> list[str]:
        return [self.read(im) for im in images]

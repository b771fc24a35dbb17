"""Evaluation metrics: image fidelity (PSNR, SSIM), text (CER, exact match), codebook use, and image grids.

Conventions: image batches are float tensors (B, C, H, W) in [-1, 1] unless a function says otherwise; per-image
metrics return a float32 tensor of shape (B,) on the CPU so callers can gather and average them across ranks.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

try:
    from skimage.metrics import structural_similarity
except ImportError:  # pragma: no cover - scikit-image is in requirements.txt; ssim() says so
    structural_similarity = None
PSNR_CAP_DB = 100.0


# ---------------------------------------------------------------------------------------------------------------
# image fidelity
# ---------------------------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, max_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB: ``10 log10(data_range^2 / MSE)``, MSE over all channels and pixels of each image.

    ``data_range`` is the width of the value range: 2.0 for [-1, 1], 1.0 for [0, 1], 255 for uint8 values.
    Identical images (MSE = 0) would give +inf, which poisons means; every value is capped at ``max_db``
    (100 dB by default, far above any real reconstruction). Inputs are not clamped: clamp reconstructions to the
    valid range first if the decoder can overshoot, as a saved image would be.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    diff = x.detach().double() - y.detach().double()
    mse = diff.pow(2).flatten(1).mean(dim=1)
    with torch.no_grad():
        val = 10.0 * torch.log10(data_range ** 2 / mse)  # mse = 0 -> +inf, capped below
    return val.clamp(max=max_db).float().cpu()


def _ssim_win_size(h: int, w: int, win_size: int | None) -> int:
    """skimage's window must be odd and fit in the image; use its default 7 when it fits, else the largest odd
    size that does (e.g. 5 for a 5x5 image). Images smaller than 3 px on a side have no meaningful SSIM."""
    side = min(h, w)
    if win_size is None:
        win_size = 7 if side >= 7 else (side if side % 2 else side - 1)
    if win_size < 3 or win_size % 2 == 0 or win_size > side:
        raise ValueError(f"ssim: win_size={win_size} invalid for a {h}x{w} image (odd, 3 <= win_size <= {side})")
    return win_size


def ssim(x: torch.Tensor, y: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         win_size: int | None = None) -> torch.Tensor:
    """Per-image SSIM from ``skimage.metrics.structural_similarity`` (uniform window, skimage's defaults).

    Each image is mapped from ``value_range`` to [0, 1], clamped, and passed as HWC float64 with
    ``channel_axis=-1, data_range=1.0``; SSIM is the mean over channels and window positions. ``win_size`` defaults
    to 7 (valid for 32x128 text strips and 8x8 digits); see ``_ssim_win_size`` for smaller images.
    """
    if structural_similarity is None:  # pragma: no cover - scikit-image is in requirements.txt
        raise ImportError("ssim needs scikit-image: pip install scikit-image==0.26.0")
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    lo, hi = value_range
    ws = _ssim_win_size(x.shape[-2], x.shape[-1], win_size)

    def to_hwc(t: torch.Tensor) -> np.ndarray:
        t = ((t.detach().double() - lo) / (hi - lo)).clamp(0.0, 1.0)
        return t.permute(0, 2, 3, 1).cpu().numpy()

    a, b = to_hwc(x), to_hwc(y)
    vals = [structural_similarity(a[i], b[i], channel_axis=-1, data_range=1.0, win_size=ws)
            for i in range(a.shape[0])]
    return torch.tensor(vals, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------------
_WS = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """Case-fold, collapse runs of whitespace to one space, strip the ends."""
    return _WS.sub(" ", s).strip().casefold()


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute) with a two-row DP, O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_error_rate(hyp: str, ref: str, normalize: bool = False) -> float:
    """Edit distance / max(1, len(ref)). An empty ref scores len(hyp) (0 if both are empty); CER can exceed 1."""
    if normalize:
        hyp, ref = normalize_text(hyp), normalize_text(ref)
    return edit_distance(hyp, ref) / max(1, len(ref))


def corpus_cer(hyps: Sequence[str], refs: Sequence[str], normalize: bool = False) -> float:
    """Total edit distance / total reference length, so long references weigh more than in a mean of CERs."""
    if len(hyps) != len(refs):
        raise ValueError(f"corpus_cer: {len(hyps)} hypotheses vs {len(refs)} references")
    if normalize:
        hyps, refs = [normalize_text(h) for h in hyps], [normalize_text(r) for r in refs]
    dist = sum(edit_distance(h, r) for h, r in zip(hyps, refs))
    return dist / max(1, sum(len(r) for r in refs))


def exact_match(hyp: str, ref: str, normalize: bool = True) -> bool:
    """String equality, after ``normalize_text`` (case and whitespace) when ``normalize``."""
    if normalize:
        hyp, ref = normalize_text(hyp), normalize_text(ref)
    return hyp == ref


def mean_exact_match(hyps: Sequence[str], refs: Sequence[str], normalize: bool = True) -> float:
    """Fraction of pairs that match exactly (0.0 for empty lists)."""
    if len(hyps) != len(refs):
        raise ValueError(f"mean_exact_match: {len(hyps)} hypotheses vs {len(refs)} references")
    if not refs:
        return 0.0
    return sum(exact_match(h, r, normalize) for h, r in zip(hyps, refs)) / len(refs)


def text_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """The pooled scores of predicted texts against their references, both after ``normalize_text``:
    ``exact_match`` (:func:`mean_exact_match`) and ``cer`` (:func:`corpus_cer`)."""
    return {"exact_match": mean_exact_match(hyps, refs), "cer": corpus_cer(hyps, refs, normalize=True)}


# ---------------------------------------------------------------------------------------------------------------
# codebook
# ---------------------------------------------------------------------------------------------------------------
def histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code (int64, length ``codebook_size``, on the indices' device) — sum it across ranks with
    ``dist.all_reduce`` before ``stats_from_histogram`` so usage is measured over the whole evaluation set."""
    flat = indices.detach().reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(f"histogram: indices outside [0, {codebook_size})")
    return torch.bincount(flat, minlength=codebook_size)


def stats_from_histogram(hist: torch.Tensor) -> dict:
    """usage = fraction of codes seen at least once; perplexity = exp(entropy) of the code distribution (1 when a
    single code is used, K when all K are used equally). An empty histogram gives usage 0 and perplexity 0."""
    hist = hist.detach().double().cpu()
    total = float(hist.sum())
    used = int((hist > 0).sum())
    if total <= 0:
        return {"usage": 0.0, "perplexity": 0.0, "used": 0, "codebook_size": hist.numel()}
    p = hist[hist > 0] / total
    entropy = float(-(p * p.log()).sum())
    return {"usage": used / hist.numel(), "perplexity": math.exp(entropy), "used": used,
            "codebook_size": hist.numel()}


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict:
    """Usage and perplexity of the codes in ``indices`` (single process; see ``histogram`` for multi-rank)."""
    return stats_from_histogram(histogram(indices, codebook_size))


# ---------------------------------------------------------------------------------------------------------------
# images out
# ---------------------------------------------------------------------------------------------------------------
def to_uint8_images(x: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] float batch (B, C, H, W) or one image (C, H, W) -> list of HxWx3 uint8 arrays (clamped, rounded;
    one-channel images are repeated to RGB)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"to_uint8_images: expected 1 or 3 channels, got {x.shape[1]}")
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(u8.permute(0, 2, 3, 1).cpu().numpy())


def _wrap(text: str, draw, font, width: int) -> list[str]:
    """``text`` as lines no wider than ``width`` pixels: broken between words (explicit newlines kept); only a word
    wider than a whole line is cut, by character."""
    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    lines = []
    for para in str(text).split("\n"):
        cur = ""
        for word in para.split(" "):
            candidate = f"{cur} {word}" if cur else word
            if fits(candidate):
                cur = candidate
                continue
            if cur:
                lines.append(cur)
            cur = ""
            for ch in word:  # the word alone: cut by character only when it is wider than a line
                if cur and not fits(cur + ch):
                    lines.append(cur)
                    cur = ""
                cur += ch
        lines.append(cur)
    return lines


def save_grid(rows: Sequence[torch.Tensor], path: str | Path, labels: Sequence[str] | None = None,
              pad: int = 2, scale: int = 1, background: int = 255,
              captions: Sequence[Sequence[str] | None] | None = None) -> Path:
    """Write a PNG with one row per batch in ``rows`` (each (N, C, H, W) in [-1, 1]) and optional row labels.

    Cells are ``max H x max W`` over all rows (smaller images sit top-left); rows may hold different N. ``scale``
    enlarges every image by an integer factor (nearest neighbour) so 32x128 strips stay legible. With no labels
    the PNG is exactly ``(pad + ncols*(W*scale+pad)) x (pad + nrows*(H*scale+pad))`` (width x height); labels add
    a left column as wide as the widest label (PIL's default font) plus ``2*pad``.

    ``captions``: per row, ``None`` or one string per image, written under that image (PIL's default font, wrapped
    to the cell width; ``\n`` starts a new line, e.g. ``"pred: ...\ntrue: ..."``). A row with captions is taller
    by its longest caption's lines; rows without keep the sizes above.
    """
    if not rows:
        raise ValueError("save_grid: no rows")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"save_grid: {len(labels)} labels for {len(rows)} rows")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"save_grid: {len(captions)} caption lists for {len(rows)} rows")
    imgs = [to_uint8_images(r) for r in rows]
    cell_h = max(a.shape[0] for row in imgs for a in row) * scale
    cell_w = max(a.shape[1] for row in imgs for a in row) * scale
    ncols = max(len(row) for row in imgs)

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    if labels:
        label_w = max(probe.textbbox((0, 0), str(t), font=font)[2] for t in labels) + 2 * pad
    line_h = probe.textbbox((0, 0), "Ag|", font=font)[3] + 1
    wrapped = []  # per row: None, or per image its caption lines
    for r, row in enumerate(imgs):
        caps = captions[r] if captions is not None else None
        if caps is not None and len(caps) > len(row):
            raise ValueError(f"save_grid: row {r} has {len(caps)} captions for {len(row)} images")
        wrapped.append(None if caps is None else [_wrap(c, probe, font, cell_w) for c in caps])
    band = [0 if w is None else max((len(x) for x in w), default=0) * line_h + pad for w in wrapped]

    width = label_w + pad + ncols * (cell_w + pad)
    height = pad + sum(cell_h + b + pad for b in band)
    canvas = Image.new("RGB", (width, height), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    top = pad
    for r, row in enumerate(imgs):
        if labels:
            l, t, _, b = draw.textbbox((0, 0), str(labels[r]), font=font)
            draw.text((pad - l, top + (cell_h - (b - t)) // 2 - t), str(labels[r]), fill=(0, 0, 0), font=font)
        for c, arr in enumerate(row):
            im = Image.fromarray(arr)
            if scale != 1:
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            left = label_w + pad + c * (cell_w + pad)
            canvas.paste(im, (left, top))
            if wrapped[r] is not None and c < len(wrapped[r]):
                for k, line in enumerate(wrapped[r][c]):
                    draw.text((left, top + cell_h + pad // 2 + k * line_h), line, fill=(0, 0, 0), font=font)
        top += cell_h + band[r] + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

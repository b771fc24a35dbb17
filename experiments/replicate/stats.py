"""Per-image metrics from the evaluation's ``_samples.jsonl`` and a bootstrap over held-out images and seeds.

Every evaluation reads the same first N held-out images in the same order, so arm A's image i and arm B's image i
are the same picture and arm A's seed s shares stage 1 with arm B's seed s: differences are bootstrapped paired.
One bootstrap draw resamples the seeds with replacement, then the images with replacement (the same images for
every drawn seed), and takes the mean; the 95 % interval is the 2.5th-97.5th percentile of 2,000 draws.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("em", "cer", "dpsnr")


def per_image(samples: Path, stage0_psnr: list[float] | None) -> dict[str, np.ndarray]:
    """{"em", "cer", "psnr", "dpsnr"} arrays over the images of one evaluation (caption metrics when captioned)."""
    from ett_ds.eval.metrics import char_error_rate, mean_exact_match
    recs = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    out = {}
    if recs and "psnr" in recs[0]:  # a caption-only evaluation (stage 1's curve) has no reconstruction
        out["psnr"] = np.array([r["psnr"] for r in recs], dtype=float)
    if stage0_psnr is not None:
        if len(stage0_psnr) != len(recs):
            raise SystemExit(f"error: {samples} has {len(recs)} images, stage 0's evaluation {len(stage0_psnr)}")
        out["dpsnr"] = out["psnr"] - np.asarray(stage0_psnr, dtype=float)
    if recs and "caption" in recs[0]:
        out["em"] = np.array([mean_exact_match([r["caption"]], [r["ref"]]) for r in recs], dtype=float)
        out["cer"] = np.array([char_error_rate(r["caption"], r["ref"], normalize=True) for r in recs], dtype=float)
    return out


def bootstrap(matrix: np.ndarray, draws: int = 2000, seed: int = 0) -> dict:
    """Mean and 95 % interval of a (seeds, images) matrix, resampling seeds then images."""
    m = np.atleast_2d(np.asarray(matrix, dtype=float))
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, m.shape[0], size=(draws, m.shape[0]))
    i_idx = rng.integers(0, m.shape[1], size=(draws, m.shape[1]))
    means = np.array([m[s][:, i].mean() for s, i in zip(s_idx, i_idx)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(m.mean()), "lo": float(lo), "hi": float(hi), "seeds": int(m.shape[0]),
            "images": int(m.shape[1])}


def arm_stats(per_seed: list[dict[str, np.ndarray]]) -> dict:
    """Bootstrap summary of each metric over an arm's seeds."""
    return {k: bootstrap(np.stack([d[k] for d in per_seed])) for k in METRICS if all(k in d for d in per_seed)}


def paired_difference(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]], key: str) -> dict | None:
    """A − B on metric ``key`` over the seeds both have (paired by seed index and image)."""
    n = min(len(a), len(b))
    if n == 0 or any(key not in d for d in a[:n] + b[:n]):
        return None
    return bootstrap(np.stack([a[i][key] - b[i][key] for i in range(n)]))


def fmt(s: dict | None, scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
    """``mean [lo, hi]``."""
    if not s:
        return "-"
    f = ("{:+.%df}" if sign else "{:.%df}") % digits
    return f"{f.format(s['mean'] * scale)} [{f.format(s['lo'] * scale)}, {f.format(s['hi'] * scale)}]"

"""``data_tools synth-text``: real text lines rendered in real fonts -> shards whose caption is the rendered text.

Every sample is a pure function of (config, seed, index): its own RNG is derived from a hash of (seed, index), so the
output is byte-identical for a seed whatever the worker count, and ``--resume`` can regenerate any shard.

Splits. Fonts and corpora are arguments (train on some fonts, evaluate on others). ``--text-split`` keeps only
captions whose stable hash falls in the train (90 %) or held-out (10 %) bucket; the hash is taken on the *final*
caption (after word windowing and truncation), so a held-out caption string never occurs in the train split.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .errors import UsageError
from .fonts import family as font_family
from .shard import fingerprint, run_shards
from .tario import json_bytes

_WORDNET_LINE = re.compile(r"^\d{8} ")
_PRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\u024f]")
NO_SHAPE = (0.0, 1.0, 0)  # (shear k, width factor s, stroke px) of unaugmented text


@dataclass(frozen=True)
class SynthConfig:
    fonts: tuple[str, ...]
    corpus: tuple[str, ...]
    height: int = 32
    width: int = 128
    min_chars: int = 1
    max_chars: int = 16
    words: tuple[int, int] | None = None   # take a window of lo..hi consecutive words from each line
    seed: int = 0
    text_split: str = "all"                # all | train | heldout
    heldout_percent: int = 10
    noise: float = 12.0                    # max std of the gaussian background noise (0..255 scale)
    max_rotation: float = 3.0              # degrees
    min_font_px: int = 8
    palette: str = "any"                   # any: random colours, luma contrast >= 90 | ink: dark ink on light paper
    min_scale: float = 0.7                 # font size: largest that fits x uniform(min_scale, 1)
    layout: str = "random"                 # random: anywhere inside the image | centre: centred
    # augmentation (all off by default; the demo's training split turns them on): see ``_augment``
    slant: float = 0.0                     # max |horizontal shear| of the text (x += k * y), 0.25 ~ 14 degrees
    stretch: float = 0.0                   # max relative change of the text's width, uniform(1 - s, 1 + s)
    bold: float = 0.0                      # probability of a heavier stroke (a 1 px outline in the ink colour)
    blur: float = 0.0                      # max radius (px) of a Gaussian blur, applied to half the samples

    @property
    def augments(self) -> bool:
        return bool(self.slant or self.stretch or self.bold or self.blur)


def resolve_fonts(patterns: list[str]) -> list[str]:
    found: set[str] = set()
    for pat in patterns:
        hits = glob.glob(pat, recursive=True) if glob.has_magic(pat) else ([pat] if Path(pat).is_file() else [])
        if not hits:
            raise UsageError(f"no font file matches {pat}")
        found.update(h for h in hits if h.lower().endswith((".ttf", ".otf", ".ttc")))
    if not found:
        raise UsageError(f"no .ttf/.otf font among {' '.join(patterns)}")
    fonts = sorted(found)
    for f in fonts:
        try:
            ImageFont.truetype(f, 12)
        except OSError:
            raise UsageError(f"cannot load font {f}") from None
    return fonts


def parse_corpus_line(line: str) -> str | None:
    """WordNet ``data.*`` lines keep only the definition (gloss after '|', before the first '; "' example)."""
    if line.startswith("  "):  # WordNet licence header
        return None
    if _WORDNET_LINE.match(line) and " | " in line:
        line = line.split(" | ", 1)[1].split('; "', 1)[0].split(";", 1)[0]
    line = _PRINTABLE.sub("", " ".join(line.split()))
    return line or None


@functools.lru_cache(maxsize=8)
def load_corpus(paths: tuple[str, ...]) -> tuple[str, ...]:
    lines: list[str] = []
    for p in paths:
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                lines.extend(t for t in map(parse_corpus_line, f) if t)
        except OSError:
            raise UsageError(f"cannot read corpus {p}") from None
    if not lines:
        raise UsageError(f"no text lines in {' '.join(paths)}")
    return tuple(lines)


def text_bucket(text: str, heldout_percent: int = 10) -> str:
    h = int.from_bytes(hashlib.sha1(text.lower().encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < heldout_percent else "train"


def _truncate(tokens: list[str], max_chars: int) -> str:
    while len(tokens) > 1 and len(" ".join(tokens)) > max_chars:
        tokens = tokens[:-1]
    return " ".join(tokens)[:max_chars].strip()


def pick_text(rng: random.Random, cfg: SynthConfig) -> str:
    lines = load_corpus(cfg.corpus)
    for _ in range(1000):
        tokens = lines[rng.randrange(len(lines))].split()
        if cfg.words:
            k = rng.randint(*cfg.words)
            start = rng.randrange(max(1, len(tokens) - k + 1))
            tokens = [t.strip(',;:()"\'') for t in tokens[start:start + k]]
            tokens = [t for t in tokens if t]
        text = _truncate(tokens, cfg.max_chars)
        if len(text) < cfg.min_chars:
            continue
        if cfg.text_split != "all" and text_bucket(text, cfg.heldout_percent) != cfg.text_split:
            continue
        return text
    raise UsageError("the corpus yields no line within --min-chars/--max-chars for this split")


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _fits(text: str, font_path: str, size: int, box: tuple[int, int], shape: tuple = NO_SHAPE):
    """The text's bbox at ``size`` if it fits ``box`` once sheared by k, stretched by s, stroked (``shape``)."""
    k, s, stroke = shape
    bbox = _font(font_path, size).getbbox(text, stroke_width=stroke)
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    return bbox if s * (w + abs(k) * h) <= box[0] and h <= box[1] else None


def _largest_size(text: str, font_path: str, box: tuple[int, int], lo: int, hi: int,
                  shape: tuple = NO_SHAPE) -> int | None:
    if _fits(text, font_path, lo, box, shape) is None:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(text, font_path, mid, box, shape) else (lo, mid - 1)
    return lo


def _augment(rng: random.Random, cfg: SynthConfig) -> tuple[float, float, int]:
    """(shear k, width factor s, stroke px) of one sample; drawn only for the knobs that are on (none: ``NO_SHAPE``,
    nothing drawn from ``rng``)."""
    k = rng.uniform(-cfg.slant, cfg.slant) if cfg.slant else 0.0
    s = rng.uniform(1 - cfg.stretch, 1 + cfg.stretch) if cfg.stretch else 1.0
    stroke = int(rng.random() < cfg.bold) if cfg.bold else 0
    return k, s, stroke


def _glyphs(text: str, font: ImageFont.FreeTypeFont, shape: tuple | None) -> Image.Image:
    """The text as an ink mask to paste at its top-left: shaped (``_shaped_glyphs``), or, with ``shape`` None, as the
    font draws it, the size of its bbox (pasted, the same pixels as drawing the text in place)."""
    if shape is not None:
        return _shaped_glyphs(text, font, shape)
    bbox = font.getbbox(text)
    img = Image.new("L", (bbox[2] - bbox[0], bbox[3] - bbox[1]), 0)
    ImageDraw.Draw(img).text((-bbox[0], -bbox[1]), text, fill=255, font=font)
    return img


def _shaped_glyphs(text: str, font: ImageFont.FreeTypeFont, shape: tuple) -> Image.Image:
    """The text as an ink mask cropped to its ink, sheared by k and stretched by s about its centre line."""
    k, s, stroke = shape
    bbox = font.getbbox(text, stroke_width=stroke)
    pad = 2
    cw, ch = bbox[2] - bbox[0] + 2 * pad, bbox[3] - bbox[1] + 2 * pad
    src = Image.new("L", (cw, ch), 0)
    ImageDraw.Draw(src).text((pad - bbox[0], pad - bbox[1]), text, fill=255, font=font, stroke_width=stroke,
                             stroke_fill=255)
    off = s * abs(k) * ch / 2  # forward: X = s * (x + k * (y - ch / 2)) + off, Y = y; PIL takes the inverse map
    out_w = max(1, math.ceil(s * (cw + abs(k) * ch)))
    dst = src.transform((out_w, ch), Image.Transform.AFFINE, (1 / s, -k, -off / s + k * ch / 2, 0, 1, 0),
                        resample=Image.Resampling.BICUBIC)
    ink = dst.getbbox()
    return dst.crop(ink) if ink else dst


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


PALETTES = ("any", "ink")


def pick_colours(rng: random.Random, palette: str) -> tuple[tuple, tuple]:
    """(background, foreground) RGB. ``any``: random colours whose luma differs by >= 90; ``ink``: a near-grey
    light paper (200-255) and dark ink (0-70), the easy case for a small tokenizer."""
    if palette == "ink":
        paper, ink = rng.randrange(200, 256), rng.randrange(0, 71)
        return (tuple(min(255, max(0, paper + rng.randrange(-12, 13))) for _ in range(3)),
                tuple(min(255, max(0, ink + rng.randrange(-12, 13))) for _ in range(3)))
    if palette != "any":
        raise UsageError(f"unknown palette {palette!r}; choose one of {', '.join(PALETTES)}")
    while True:
        bg = tuple(rng.randrange(256) for _ in range(3))
        fg = tuple(rng.randrange(256) for _ in range(3))
        if abs(_luma(bg) - _luma(fg)) >= 90:
            return bg, fg


def sample_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"synth:{seed}:{index}".encode()).digest()[:8], "big")


def render_sample(cfg: SynthConfig, index: int) -> tuple[dict[str, bytes], dict]:
    """Render sample ``index``: returns (members, metadata)."""
    sseed = sample_seed(cfg.seed, index)
    rng = random.Random(sseed)
    H, W = cfg.height, cfg.width
    text = pick_text(rng, cfg)
    font = cfg.fonts[rng.randrange(len(cfg.fonts))]
    angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
    shape = _augment(rng, cfg)
    slack = math.ceil(abs(math.sin(math.radians(angle))) * W / 2)  # vertical drift of the ends after rotation
    box = (W - 4, H - 2 - 2 * slack)
    size = None
    while size is None:
        size = _largest_size(text, font, box, cfg.min_font_px, max(cfg.min_font_px, int(H * 1.5)), shape)
        if size is None:  # too long even at the smallest size: drop a word (or a character)
            shorter = _truncate(text.split(), len(text) - 1)
            if not shorter or shorter == text:
                raise UsageError(f"--size {H}x{W} is too small to render text at {cfg.min_font_px}px")
            text = shorter
    size = max(cfg.min_font_px, round(size * rng.uniform(min(cfg.min_scale, 1.0), 1.0)))
    # augmented: the shaped ink, placed by its own extent; plain: placed by the font's bbox
    glyphs = _glyphs(text, _font(font, size), shape if cfg.augments else None)
    tw, th = glyphs.size
    if cfg.layout == "centre":
        x, y = (W - tw) // 2, (H - th) // 2
    elif cfg.layout == "random":
        x = rng.randint(2, max(2, W - 2 - tw))
        y = rng.randint(1 + slack, max(1 + slack, H - 1 - slack - th))
    else:
        raise UsageError(f"unknown layout {cfg.layout!r}; choose random or centre")

    bg, fg = pick_colours(rng, cfg.palette)
    mask = Image.new("L", (W, H), 0)
    mask.paste(glyphs, (x, y))
    if abs(angle) > 0.05:
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, center=(W / 2, H / 2))
    img = Image.composite(Image.new("RGB", (W, H), fg), Image.new("RGB", (W, H), bg), mask)
    if cfg.blur and rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, cfg.blur)))
    sigma = rng.uniform(0, cfg.noise)
    if sigma > 0.5:
        noise = np.random.default_rng(sseed).normal(0.0, sigma, (H, W, 1))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    meta = {"text": text, "caption": text, "font": Path(font).name, "family": font_family(font), "font_px": size,
            "angle": round(angle, 3), "seed": cfg.seed, "index": index, "width": W, "height": H}
    if cfg.augments:
        meta.update(slant=round(shape[0], 3), stretch=round(shape[1], 3), stroke=shape[2])
    return {"png": buf.getvalue(), "txt": text.encode("utf-8"), "json": json_bytes(meta)}, meta


def produce_range(cfg: SynthConfig, start: int, stop: int):
    for i in range(start, stop):
        yield render_sample(cfg, i)[0], None


def synth_text(cfg: SynthConfig, out: str | Path, *, num: int, prefix: str = "synth", samples_per_shard: int = 1000,
               workers: int = 1, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    if num <= 0 or samples_per_shard <= 0:
        raise UsageError("--num and --samples-per-shard must be positive")
    pick_text(random.Random(cfg.seed), cfg)  # fail early (one line) on an empty corpus or split
    starts = list(range(0, num, samples_per_shard))
    producers = [functools.partial(produce_range, cfg, s, min(num, s + samples_per_shard)) for s in starts]
    plan = {"kind": "synth-text", "config": asdict(cfg), "num": num, "samples_per_shard": samples_per_shard,
            "fonts": fingerprint(Path(f).name for f in cfg.fonts)}
    plan["config"]["fonts"] = [Path(f).name for f in cfg.fonts]  # same plan on machines with other font paths
    plan = _jsonable(plan)
    return run_shards(out, prefix, producers, plan=plan, workers=workers, resume=resume, overwrite=overwrite,
                      progress=progress, samples_total=num, desc="synth-text")


def _jsonable(obj):
    import json
    return json.loads(json.dumps(obj))

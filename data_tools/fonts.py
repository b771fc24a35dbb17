"""The fonts a machine has, grouped into type families, and the demo's split of them into training and held-out.

A font file's *family* is the name its own tables give (``ImageFont.getname()``: "DejaVu Sans Mono", "URW Gothic");
its *collection* groups the families one foundry drew as one design across widths and serifs (``DejaVuSansMono``
and ``DejaVuSerif`` are both ``DejaVu``; ``LiberationSans`` and ``LiberationMono`` are ``Liberation``). Splits are
made by collection, so no held-out family is a sibling of a training one.

Only text fonts are kept: a file must render every digit and Latin letter as a distinct, non-empty glyph (dingbats,
symbol fonts and CJK fallbacks do not), and hairline styles (ExtraLight) that vanish at the demo's 32-pixel height
are skipped.

Held out, when installed: ``Liberation`` (fonts-liberation2) and ``URW Gothic`` (fonts-urw-base35): two collections,
reported one by one. Everything else the machine has trains (DejaVu, FreeFont, the URW base 35 besides Gothic, Noto
Mono, ...); ``FONT_PACKAGES`` lists the Debian packages the smoke test and the replication install,
``HELDOUT_PACKAGES`` the two that hold the held-out collections. With neither, one family is held out, which may
share its collection with training (with DejaVu alone, DejaVu Serif; ``demo_split``).
"""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import UsageError

FONT_PACKAGES = ("fonts-dejavu-core", "fonts-dejavu-extra", "fonts-liberation2", "fonts-freefont-ttf",
                 "fonts-urw-base35", "fonts-noto-mono")
HELDOUT_PACKAGES = {"Liberation": "fonts-liberation2", "URWGothic": "fonts-urw-base35"}  # collection -> package
HELDOUT_COLLECTIONS = tuple(HELDOUT_PACKAGES)
SKIP_STYLES = ("ExtraLight", "Thin", "Hairline")
NOT_TEXT = re.compile(r"symbol|dingbat|math|fallback|emoji|icon|^D050000L$", re.I)  # families that only map glyphs
GLYPHS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def font_dirs() -> list[Path]:
    dirs = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts"]
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        dirs.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf")
    return [d for d in dirs if d.is_dir()]


def collection(font: str) -> str:
    """``DejaVuSansMono-Bold.ttf`` -> ``DejaVu``, ``LiberationSerif-Italic.ttf`` -> ``Liberation``, ``URWGothic-Book.otf``
    -> ``URWGothic``, ``FreeMonoBold.ttf`` -> ``Free``: the file name up to its first width/serif/style word."""
    stem = Path(font).stem.split("-")[0]
    m = re.match(r"(.+?)(Sans|Serif|Mono|Condensed|Narrow|Bold|Italic|Oblique|Regular)", stem)
    return m.group(1) if m else stem


@functools.lru_cache(maxsize=None)
def family(font: str) -> str:
    """The family name the font file gives itself (``DejaVu Sans Mono``)."""
    return ImageFont.truetype(font, 16).getname()[0]


@functools.lru_cache(maxsize=None)
def is_text_font(font: str) -> bool:
    """Every digit and Latin letter renders as a non-empty glyph, all of them distinct (a CJK fallback maps them to
    one box or to nothing), and the family is not a symbol, dingbat or math font (which map letters to symbols)."""
    try:
        f = ImageFont.truetype(font, 24)
    except OSError:
        return False
    if NOT_TEXT.search(f.getname()[0]):
        return False
    seen = set()
    for ch in GLYPHS:
        img = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(img).text((4, 2), ch, fill=255, font=f)
        if img.getbbox() is None:
            return False
        seen.add(img.tobytes())
    return len(seen) == len(GLYPHS)


def text_fonts() -> list[str]:
    """Every usable text font file, one path per file name (the first directory wins), sorted by name."""
    by_name: dict[str, str] = {}
    for d in font_dirs():
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in (".ttf", ".otf") and not any(s in p.name for s in SKIP_STYLES):
                by_name.setdefault(p.name, str(p))
    return [by_name[n] for n in sorted(by_name) if is_text_font(by_name[n])]


def demo_split(fonts: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(training fonts, held-out fonts) of ``fonts`` (default: ``text_fonts()``); a UsageError when there are none.

    - ``HELDOUT_COLLECTIONS`` installed beside other fonts: those collections are held out whole, the rest trains;
    - else (none of them installed, or nothing else): the family (``family``: the name the font's tables give)
      last in name order is held out and the others train: whole families apart, not collections (DejaVu Serif held
      out, DejaVu Sans trains);
    - one family only: every fifth file (the first, the sixth, ...) is held out, the others train;
    - one file only: it is both."""
    fonts = text_fonts() if fonts is None else fonts
    if not fonts:
        raise UsageError("no text fonts found: apt-get install -y " + " ".join(FONT_PACKAGES))
    held = [f for f in fonts if collection(f) in HELDOUT_COLLECTIONS]
    if held and len(held) < len(fonts):
        return [f for f in fonts if f not in held], held
    if len(fonts) == 1:
        return fonts, fonts
    fams = sorted({family(f) for f in fonts})
    if len(fams) > 1:
        held = [f for f in fonts if family(f) == fams[-1]]
    else:
        held = fonts[::5]
    return [f for f in fonts if f not in held], held

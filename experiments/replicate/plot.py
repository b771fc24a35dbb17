"""Two PNGs drawn with PIL (matplotlib is not a dependency): EM against ΔPSNR per arm with 95 % intervals in both
directions, and stage 0's validation PSNR curve."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {"frozen": (90, 90, 90), "und_only": (200, 50, 50), "ett": (40, 90, 200), "index": (40, 150, 80)}


def _kind(name: str) -> str:
    base = name.removeprefix("text_")
    return next((k for k in ("und_only", "ett", "index") if base.startswith(k)), "frozen")


class _Axes:
    def __init__(self, box, xlim, ylim):
        self.box, self.xlim, self.ylim = box, xlim, ylim

    def __call__(self, x, y):
        (l, t, r, b), (x0, x1), (y0, y1) = self.box, self.xlim, self.ylim
        return l + (x - x0) / (x1 - x0) * (r - l), b - (y - y0) / (y1 - y0) * (b - t)


def _frame(d, ax, font, xlabel, ylabel, xfmt="{:.2f}", yfmt="{:.0f}", nx=5, ny=5):
    l, t, r, b = ax.box
    d.rectangle([l, t, r, b], outline="black")
    for k in range(nx + 1):
        x = ax.xlim[0] + k * (ax.xlim[1] - ax.xlim[0]) / nx
        px, _ = ax(x, ax.ylim[0])
        d.line([(px, b), (px, b + 4)], fill="black")
        d.text((px - 12, b + 6), xfmt.format(x), fill="black", font=font)
    for k in range(ny + 1):
        y = ax.ylim[0] + k * (ax.ylim[1] - ax.ylim[0]) / ny
        _, py = ax(ax.xlim[0], y)
        d.line([(l - 4, py), (l, py)], fill="black")
        d.text((l - 36, py - 6), yfmt.format(y), fill="black", font=font)
    d.text(((l + r) // 2 - 60, b + 22), xlabel, fill="black", font=font)
    d.text((l, t - 16), ylabel, fill="black", font=font)


def _points(table: dict) -> list[tuple[str, dict, dict]]:
    return [(name, r["stats"]["em"], r["stats"]["dpsnr"]) for name, r in table["arms"].items()
            if "em" in r["stats"] and "dpsnr" in r["stats"]]


def em_vs_dpsnr(path: Path, panels: list[tuple[str, dict]]) -> None:
    """One panel per (title, table): a point per arm at (mean ΔPSNR, mean EM), whiskers = 95 % bootstrap intervals
    in both directions, numbered; the key under each panel gives number, arm, EM and ΔPSNR. Shared axes."""
    font = ImageFont.load_default()
    allpts = [p for _, t in panels for p in _points(t)]
    if not allpts:
        return
    xs = [v for _, _, p in allpts for v in (p["lo"], p["hi"])] + [0.0]
    pad = max(0.1, 0.05 * (max(xs) - min(xs)))
    xlim = (min(xs) - pad, max(xs) + pad)
    rows = max(len(_points(t)) for _, t in panels)
    w, h = 560, 500
    img = Image.new("RGB", (w * len(panels) + 20, h + 14 * rows + 40), "white")
    d = ImageDraw.Draw(img)
    for k, (title, table) in enumerate(panels):
        ax = _Axes((k * w + 60, 40, k * w + w - 20, h - 50), xlim, (0.0, 100.0))
        _frame(d, ax, font, "dPSNR vs stage 0 (dB)", "caption exact match (%)")
        d.text((k * w + 60, 6), title, fill="black", font=font)
        zx, _ = ax(0.0, 0.0)
        d.line([(zx, ax.box[1]), (zx, ax.box[3])], fill=(200, 200, 200))
        for n, (name, e, p) in enumerate(_points(table), 1):
            c = COLORS[_kind(name)]
            x, y = ax(p["mean"], 100 * e["mean"])
            d.line([(ax(p["lo"], 0)[0], y), (ax(p["hi"], 0)[0], y)], fill=c)
            d.line([(x, ax(0, 100 * e["lo"])[1]), (x, ax(0, 100 * e["hi"])[1])], fill=c)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
            d.text((x + 5, y - 13), str(n), fill=c, font=font)
            d.text((k * w + 60, h + 14 * (n - 1)), f"{n:2d} {name}: EM {100 * e['mean']:.1f} %, "
                   f"dPSNR {p['mean']:+.2f} dB", fill=c, font=font)
    foot = h + 14 * rows + 8
    d.text((20, foot), "whiskers: 95% bootstrap interval over images and seeds; grey frozen, red "
           "understanding-only, blue ETT, green index", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def stage0_curve(path: Path, s0: dict) -> None:
    """Validation PSNR by step: the constant-lr run (blue) up to its stop (red line), then the cooldown (orange)."""
    font = ImageFont.load_default()
    parts = [(sorted((int(k), float(v)) for k, v in s0["curve"].items()), (40, 90, 200)),
             (sorted((int(k), float(v)) for k, v in (s0.get("cooldown_curve") or {}).items()), (230, 130, 30))]
    start = [p for p in parts[0][0] if p[0] == int(s0["stopped_at"])]
    if parts[1][0] and start:  # the cooldown starts from the plateau's checkpoint
        parts[1][0].insert(0, start[0])
    pts = [p for part, _ in parts for p in part]
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax = _Axes((70, 30, 560, 300), (0, max(xs)), (min(ys) - 0.5, max(ys) + 0.5))
    img = Image.new("RGB", (600, 350), "white")
    d = ImageDraw.Draw(img)
    _frame(d, ax, font, "stage-0 step", "validation PSNR (dB)", xfmt="{:.0f}", yfmt="{:.1f}")
    for curve, color in parts:
        if len(curve) > 1:
            d.line([ax(x, y) for x, y in curve], fill=color, width=2)
        for x, y in curve:
            px, py = ax(x, y)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    sx, _ = ax(s0["stopped_at"], 0)
    d.line([(sx, ax.box[1]), (sx, ax.box[3])], fill=(200, 50, 50))
    d.text((sx - 70, ax.box[1] + 4), f"plateau {s0['stopped_at']}", fill=(200, 50, 50), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)

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


def _frame(d, ax, font, xlabel, ylabel, nx=5, ny=5):
    l, t, r, b = ax.box
    d.rectangle([l, t, r, b], outline="black")
    for k in range(nx + 1):
        x = ax.xlim[0] + k * (ax.xlim[1] - ax.xlim[0]) / nx
        px, _ = ax(x, ax.ylim[0])
        d.line([(px, b), (px, b + 4)], fill="black")
        d.text((px - 12, b + 6), f"{x:.2f}", fill="black", font=font)
    for k in range(ny + 1):
        y = ax.ylim[0] + k * (ax.ylim[1] - ax.ylim[0]) / ny
        _, py = ax(ax.xlim[0], y)
        d.line([(l - 4, py), (l, py)], fill="black")
        d.text((l - 40, py - 6), f"{y:.1f}", fill="black", font=font)
    d.text(((l + r) // 2 - 60, b + 22), xlabel, fill="black", font=font)
    d.text((8, t - 18), ylabel, fill="black", font=font)


def em_vs_dpsnr(path: Path, tables: list[dict]) -> None:
    """One point per arm (mean), whiskers = 95 % bootstrap intervals; grid cells hollow, reported arms filled."""
    font = ImageFont.load_default()
    pts = []
    for k, table in enumerate(tables):
        final = k == len(tables) - 1
        for name, r in table["arms"].items():
            st = r["stats"]
            if "em" in st and "dpsnr" in st:
                pts.append((name, final, st["em"], st["dpsnr"]))
    xs = [v for _, _, _, p in pts for v in (p["lo"], p["hi"])] + [0.0]
    ys = [100 * v for _, _, e, _ in pts for v in (e["lo"], e["hi"])] + [0.0]
    pad_x = max(0.1, 0.08 * (max(xs) - min(xs)))
    ax = _Axes((70, 40, 680, 480), (min(xs) - pad_x, max(xs) + pad_x), (0.0, min(100.0, max(ys) + 8)))
    img = Image.new("RGB", (1000, 530), "white")
    d = ImageDraw.Draw(img)
    _frame(d, ax, font, "dPSNR vs stage 0 (dB)", "caption exact match (%) on the split of its table")
    zx, _ = ax(0.0, 0.0)
    d.line([(zx, ax.box[1]), (zx, ax.box[3])], fill=(200, 200, 200))
    legend = []
    for name, final, e, p in pts:
        c = COLORS[_kind(name)]
        x, y = ax(p["mean"], 100 * e["mean"])
        xl, _ = ax(p["lo"], 0)
        xh, _ = ax(p["hi"], 0)
        _, yl = ax(0, 100 * e["lo"])
        _, yh = ax(0, 100 * e["hi"])
        d.line([(xl, y), (xh, y)], fill=c)
        d.line([(x, yl), (x, yh)], fill=c)
        rad = 4
        d.ellipse([x - rad, y - rad, x + rad, y + rad], outline=c, fill=c if final else "white", width=2)
        d.text((x + 6, y - 12), name, fill=c, font=font)
        legend.append(name)
    d.text((700, 40), "filled: reported arms (held-out,", fill="black", font=font)
    d.text((700, 54), "  all seeds); hollow: grid cells", fill="black", font=font)
    d.text((700, 68), "  (validation, first seed)", fill="black", font=font)
    d.text((700, 88), "whiskers: 95% bootstrap interval", fill="black", font=font)
    for i, (k, c) in enumerate(COLORS.items()):
        d.text((700, 112 + 14 * i), f"o {k}", fill=c, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def stage0_curve(path: Path, s0: dict) -> None:
    """Validation PSNR by step: the constant-lr run (blue) up to its stop (red line), then the cooldown (orange)."""
    font = ImageFont.load_default()
    parts = [(sorted((int(k), float(v)) for k, v in s0["curve"].items()), (40, 90, 200)),
             (sorted((int(k), float(v)) for k, v in (s0.get("cooldown_curve") or {}).items()), (230, 130, 30))]
    pts = [p for part, _ in parts for p in part]
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax = _Axes((70, 30, 560, 300), (0, max(xs)), (min(ys) - 0.5, max(ys) + 0.5))
    img = Image.new("RGB", (600, 350), "white")
    d = ImageDraw.Draw(img)
    _frame(d, ax, font, "stage-0 step", "validation PSNR (dB)")
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

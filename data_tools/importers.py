"""``data_tools import``: real captioned images that install from Debian packages, turned into shards.

* ``tuxpaint``: ``tuxpaint-stamps-default`` -- PNG stamps (mostly RGBA cut-outs) whose sibling ``.txt`` starts with
  a one-line English caption; alpha is composited on white. ``*_mirror`` / ``*_back`` variants are skipped (they
  duplicate a stamp and have no caption of their own). The top-level category is kept in the json, and
  ``--only-category`` / ``--exclude-category`` give held-out category splits.
* ``fashion-mnist``: ``dataset-fashion-mnist`` -- 28x28 grey idx files; captions from a template.
"""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

from PIL import Image

from .errors import UsageError
from .shard import EncodeOptions, Item

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise UsageError(f"{path} not found: install it with 'apt-get install -y {package}' (or pass --root)")


def tuxpaint_items(root: Path = TUXPAINT_DIR, only: list[str] | None = None,
                   exclude: list[str] | None = None) -> list[Item]:
    _require(root, "tuxpaint-stamps-default")
    items = []
    for png in sorted(root.rglob("*.png")):
        if png.stem.endswith(("_mirror", "_back")):
            continue
        txt = png.with_suffix(".txt")
        if not txt.exists():
            continue
        category = png.relative_to(root).parts[0]
        if (only and category not in only) or (exclude and category in exclude):
            continue
        raw = txt.read_bytes()
        first = raw.splitlines()[0] if raw.strip() else b""
        items.append(Item(image=str(png), caption=first,
                          extra={"source": png.relative_to(root).as_posix(), "category": category,
                                 "dataset": "tuxpaint-stamps-default"},
                          size_hint=png.stat().st_size))
    if not items:
        raise UsageError(f"no captioned stamps under {root} for these categories")
    return items


TUXPAINT_OPTIONS = EncodeOptions(format="png", max_side=256, flatten_alpha=True)


def _read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, = struct.unpack(">I", data[:4])
    if got != magic:
        raise UsageError(f"{path}: not an idx file (magic {got:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


def fashion_mnist_items(root: Path = FASHION_DIR, split: str = "train", limit: int | None = None,
                        template: str = "a photo of a {label}") -> list[Item]:
    _require(root, "dataset-fashion-mnist")
    stem = "train" if split == "train" else "t10k"
    (n, rows, cols), pixels = _read_idx(root / f"{stem}-images-idx3-ubyte.gz", 0x803)
    (n_labels,), labels = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", 0x801)
    if n != n_labels:
        raise UsageError(f"{root}: {n} images but {n_labels} labels")
    n = min(n, limit) if limit else n
    items = []
    for i in range(n):
        img = Image.frombytes("L", (cols, rows), pixels[i * rows * cols:(i + 1) * rows * cols])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        label = FASHION_LABELS[labels[i]]
        items.append(Item(data=buf.getvalue(), caption=template.format(label=label),
                          extra={"label": int(labels[i]), "label_name": label, "index": i, "split": split,
                                 "dataset": "fashion-mnist"},
                          size_hint=len(buf.getvalue())))
    return items

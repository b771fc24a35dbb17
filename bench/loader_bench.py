"""Input-pipeline benchmark (a script, not a test): prints JSON lines and the two ratios of issue 3.

1. ``train_batches`` images/s per worker (tar read + shuffle + decode + resize/crop + uint8 tensor + collate, as
   the trainer's Batcher does it) against a bare ``PIL.Image.open(path).convert("RGB")`` loop over the same JPEG
   files, measured in the same run (goal >= 0.9).
2. ``data_tools shard`` (``--format keep``: validate, no re-encode) against a bare ``tarfile`` write of the same
   files (goal >= 0.8).

    OMP_NUM_THREADS=1 python bench/loader_bench.py [--num 600] [--src 384x288] [--size 256x256] [--content photo]

``--content photo`` (default) cuts the JPEGs from scikit-image's bundled photographs (astronaut, coffee, cat,
rocket, Hubble deep field, retina, ...); ``--content noise`` writes gradients under Gaussian noise, the worst case
for a JPEG decoder (Huffman decoding dominates, so reduced-scale DCT decoding saves little).
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.shard import EncodeOptions, Item, shard_items  # noqa: E402
from ett_ds.data.shards import train_batches  # noqa: E402
from ett_ds.data.transforms import image_to_uint8  # noqa: E402

SIZE = (256, 256)


def make_example(sample):
    return {"image": image_to_uint8(sample["image"], SIZE, train=True, rng=sample["__rng__"])}


def collate(examples):
    import torch
    return {"image": torch.stack([e["image"] for e in examples])}


PHOTOS = ("astronaut", "coffee", "cat", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera")


def photo(i: int, rng, h: int, w: int) -> np.ndarray:
    """A random crop (aspect w:h, 60-100% of the largest that fits) of one bundled photograph, resized to w x h."""
    import skimage.data
    img = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
    scale = rng.uniform(0.6, 1.0) * min(img.width / w, img.height / h)
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
    return np.asarray(img.resize((w, h), Image.Resampling.LANCZOS, box=(x, y, x + cw, y + ch)))


def make_images(root: Path, num: int, src: tuple[int, int], content: str = "photo") -> list[Path]:
    rng = np.random.default_rng(0)
    h, w = src
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(num):
        if content == "photo":
            arr = photo(i, rng, h, w)
        else:
            base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + 9 * i) % 256], -1)
            arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        p = root / f"img{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        p.with_suffix(".txt").write_text(f"synthetic picture {i}")
        paths.append(p)
    return paths


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=600)
    ap.add_argument("--src", default="384x288", help="source WxH")
    ap.add_argument("--size", default="256x256", help="pipeline output HxW")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--content", choices=("photo", "noise"), default="photo")
    a = ap.parse_args()
    global SIZE
    SIZE = tuple(int(v) for v in a.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as name:  # removed afterwards, even on error
        run_all(a, Path(name))
    return 0


def run_all(a, tmp: Path) -> None:
    sw, sh = (int(v) for v in a.src.split("x"))
    (tmp / "img").mkdir()
    paths = make_images(tmp / "img", a.num, (sh, sw), a.content)
    n = len(paths)
    emit(setup={"images": n, "content": a.content, "src_wh": [sw, sh], "out_hw": list(SIZE),
                "bytes": sum(p.stat().st_size for p in paths)})

    # ---- 2. sharding vs a bare tarfile write -----------------------------------------------------------------
    def bare_tar():
        with tarfile.open(tmp / "bare.tar", "w") as tar:
            for p in paths:
                tar.add(p, arcname=p.name)
                tar.add(p.with_suffix(".txt"), arcname=p.with_suffix(".txt").name)

    items = [Item(image=str(p), caption=p.with_suffix(".txt").read_bytes(), extra={"source": p.name},
                  size_hint=p.stat().st_size) for p in paths]
    run = [0]

    def shard():
        run[0] += 1
        shard_items(items, tmp / f"shards{run[0]}", prefix="b", samples_per_shard=max(1, n // 4),
                    opts=EncodeOptions(format="keep", validate="quick"), progress=False)

    t_bare, t_shard = best_of(bare_tar, a.repeats), best_of(shard, a.repeats)
    shard_ratio = t_bare / t_shard
    emit(bench="shard", bare_tar_img_s=round(n / t_bare), data_tools_shard_img_s=round(n / t_shard),
         ratio=round(shard_ratio, 3), goal=0.8)

    # ---- 1. train_batches per worker vs a bare PIL decode loop ------------------------------------------------
    def bare_decode():
        for p in paths:
            with Image.open(p) as img:
                img.convert("RGB")

    def pipeline(decode_size=None, num_workers=0):
        batch = 32
        it = train_batches(str(tmp / "shards1"), batch_size=batch, make_example=make_example, collate=collate,
                           shuffle_buffer=200, rank=0, world_size=1, num_workers=num_workers,
                           decode_size=decode_size)
        got = 0
        while got < n:
            got += next(it)["image"].shape[0]
        return got

    t_pil = best_of(bare_decode, a.repeats)
    emit(bench="bare_pil_decode", img_s=round(n / t_pil))
    results = {}
    for label, kw in [("full_decode", {}), ("jpeg_draft", {"decode_size": SIZE})]:
        t = best_of(lambda: pipeline(**kw), a.repeats)
        results[label] = (n / t) / (n / t_pil)
        emit(bench=f"train_batches_{label}", workers=0, img_s_per_worker=round(n / t),
             ratio_vs_bare_pil=round(results[label], 3), goal=0.9)
    t2 = best_of(lambda: pipeline(num_workers=2), 1)
    emit(bench="train_batches_full_decode", workers=2, img_s_total=round(n / t2),
         img_s_per_worker=round(n / t2 / 2), note="2 workers on a shared 2-core machine: startup included")
    emit(summary={"loader_ratio_full_decode": round(results["full_decode"], 3),
                  "loader_ratio_jpeg_draft": round(results["jpeg_draft"], 3),
                  "shard_ratio": round(shard_ratio, 3)})


if __name__ == "__main__":
    sys.exit(main())

"""``data_tools shard``: images + captions -> deterministic WebDataset shards (img2dataset's habits, offline).

Pipeline: read the input into a list of :class:`Item` (folder with sidecars, or a JSONL/CSV/parquet manifest), plan
the shards up front (so the item -> (shard, index) -> key mapping never depends on timing or on which shards were
already written), then write each shard in a worker: validate / re-encode every sample, write the tar under a
temporary name, rename it, and only then write ``{prefix}-NNNNNN_stats.json`` -- the completion marker that
``--resume`` trusts. ``sizes.json`` (open_clip's format) and the total ``stats.json`` are rebuilt from the per-shard
stats files at the end, so they are always consistent with what is on disk.

``--bytes-per-shard`` is planned from the *source* sizes (file sizes + caption bytes): exact for ``--format keep``,
approximate when re-encoding.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from ett_ds.data.format import (
    IMAGE_EXTS,
    SampleError,
    clean_caption,
    load_image,
    normalize_image,
    open_image,
    pixel_limit,
)

from .errors import UsageError
from .tario import ShardTarWriter, json_bytes, sample_key, shard_name

# input files: the shard image formats, and those that are re-encoded to png (gif, bmp, tiff)
SOURCE_IMAGE_EXTS = {f".{e}" for e in IMAGE_EXTS} | {".gif", ".bmp", ".tif", ".tiff"}
PIL_TO_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
EXT_TO_PIL = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class Item:
    """One input sample before validation. ``image`` is a path, or ``data`` holds the encoded bytes inline."""

    image: str | None = None
    data: bytes | None = None
    caption: str | bytes | None = None
    extra: dict = field(default_factory=dict)
    size_hint: int = 0
    reject: str | None = None  # a reason found while reading the input: the sample fails with it, in its shard


@dataclass(frozen=True)
class EncodeOptions:
    format: str = "keep"          # keep | jpg | png | webp
    quality: int = 95
    max_side: int | None = None   # longest side after resize (aspect kept); None = no resize
    min_side: int = 8             # shorter side below this -> too_small
    max_pixels: int = 128_000_000  # from the header, before decoding -> too_large
    validate: str = "quick"       # quick: header + end marker; full: decode every kept image
    flatten_alpha: bool = False   # force re-encode with alpha composited on white


# ----------------------------------------------------------------------------------------------------------------
# Per-sample processing


def decode_caption(caption: str | bytes | None) -> str:
    if caption is None:
        raise SampleError("missing_caption")
    return clean_caption(caption)


def _intact_ending(raw: bytes, fmt: str) -> bool:
    """Cheap truncation test without decoding: the container's end marker must be present."""
    if fmt == "JPEG":
        return b"\xff\xd9" in raw[-256:]
    if fmt == "PNG":
        return b"IEND" in raw[-64:]
    if fmt == "WEBP":
        return len(raw) >= 12 and int.from_bytes(raw[4:8], "little") + 8 <= len(raw)
    return True


def encode_image(raw: bytes, opts: EncodeOptions) -> tuple[str, bytes, tuple[int, int]]:
    """Validate (and if needed re-encode) one image; returns (ext, bytes, (width, height)) or raises SampleError."""
    with pixel_limit(opts.max_pixels):  # decoding below is bounded by the header check in open_image
        return _encode_image(raw, opts)


def _encode_image(raw: bytes, opts: EncodeOptions) -> tuple[str, bytes, tuple[int, int]]:
    img = open_image(raw, opts.max_pixels)
    w, h = img.size
    if min(w, h) < opts.min_side:
        raise SampleError("too_small")
    src_ext = PIL_TO_EXT.get(img.format or "")
    target = src_ext if opts.format == "keep" else opts.format
    resize = opts.max_side is not None and max(w, h) > opts.max_side
    if target is not None and target == src_ext and not resize and not opts.flatten_alpha:
        # Pass-through: the original bytes go into the shard untouched.
        if opts.validate == "full":
            load_image(img)
        elif not _intact_ending(raw, img.format):
            raise SampleError("truncated")
        return target, raw, (w, h)
    if target is None:  # keep + a format the loader does not read (gif, bmp, tiff)
        target = "png"
    if resize:
        scale = opts.max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img.draft("RGB", size)  # JPEG: decode at a reduced scale directly
    load_image(img)
    img = normalize_image(img, keep_gray=True)  # L and RGB are stored as they are
    if resize:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    kwargs = {"quality": opts.quality} if target in ("jpg", "webp") else {}
    if target == "png":
        kwargs = {"compress_level": 6}
    img.save(out, format=EXT_TO_PIL[target], **kwargs)
    return target, out.getvalue(), img.size


def read_source(item: Item) -> bytes:
    """The item's encoded image bytes; raises SampleError (``reject``, missing_image, unreadable)."""
    if item.reject:
        raise SampleError(item.reject)
    if item.data is not None:
        return item.data
    try:
        return Path(item.image).read_bytes()
    except FileNotFoundError:
        raise SampleError("missing_image") from None
    except OSError:
        raise SampleError("unreadable") from None


def process_item(item: Item, opts: EncodeOptions) -> dict[str, bytes]:
    """Item -> the members of one sample ({ext: bytes}); raises SampleError."""
    if item.reject:
        raise SampleError(item.reject)
    caption = decode_caption(item.caption)
    raw = read_source(item)
    ext, data, (w, h) = encode_image(raw, opts)
    meta = dict(item.extra)
    meta.update({"caption": caption, "width": w, "height": h})
    return {ext: data, "txt": caption.encode("utf-8"), "json": json_bytes(meta)}


def produce_items(items: list[Item], opts: EncodeOptions,
                  process: Callable[[Item, EncodeOptions], dict] = process_item) -> Iterable[tuple[dict | None, str | None]]:
    for item in items:
        try:
            yield process(item, opts), None
        except SampleError as e:
            yield None, e.reason
        except Exception as e:  # noqa: BLE001 - one sample never ends the shard (and its neighbours) with it
            yield None, f"error:{type(e).__name__}"


# ----------------------------------------------------------------------------------------------------------------
# Writing shards


def stats_path(out: Path, prefix: str, index: int) -> Path:
    return out / f"{prefix}-{index:06d}_stats.json"


def write_shard(out: str, prefix: str, index: int, producer: Callable[[], Iterable]) -> dict:
    """Write shard ``index`` from ``producer()`` (yields (members, None) or (None, reason)); returns its stats.

    Failed samples still consume their position, so keys of the surviving samples never depend on failures.
    """
    out_dir = Path(out)
    name = shard_name(prefix, index)
    failed: Counter = Counter()
    with ShardTarWriter(out_dir / name) as writer:
        for position, (members, reason) in enumerate(producer()):
            if members is None:
                failed[reason] += 1
            else:
                writer.write(sample_key(index, position), members)
        count = writer.count
    stats = {"shard": name, "ok": count, "failed": dict(sorted(failed.items())),
             "bytes": (out_dir / name).stat().st_size}
    tmp = stats_path(out_dir, prefix, index).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats, indent=1, sort_keys=True))
    os.replace(tmp, stats_path(out_dir, prefix, index))
    return stats


def _run_task(task):
    return write_shard(*task)


def plan_shards(items: list[Item], samples_per_shard: int | None, bytes_per_shard: int | None) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        cur = shards[-1]
        full = (samples_per_shard and len(cur) >= samples_per_shard) or \
            (bytes_per_shard and cur and size + item.size_hint > bytes_per_shard)
        if full:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.size_hint
    return shards if shards[0] else []


def fingerprint(parts: Iterable[str]) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def run_shards(out: str | Path, prefix: str, producers: list[Callable[[], Iterable]], *, plan: dict,
               workers: int = 1, resume: bool = False, overwrite: bool = False, progress: bool = True,
               samples_total: int | None = None, desc: str = "shards") -> dict:
    """Write every shard whose stats file is missing, then the dataset-level ``sizes.json`` and ``stats.json``.

    ``plan`` (options + input fingerprint) is stored in ``{prefix}_plan.json``; ``--resume`` refuses to continue a
    directory planned differently, because mixing two plans would silently duplicate or drop samples.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / f"{prefix}_plan.json"
    existing = sorted(out.glob(f"{prefix}-[0-9]*.tar")) + sorted(out.glob(f"{prefix}-*_stats.json"))
    if existing or plan_file.exists():
        if overwrite:
            for p in existing + [plan_file, out / "sizes.json", out / "stats.json"]:
                p.unlink(missing_ok=True)
        elif not resume:
            raise UsageError(f"{out} already holds '{prefix}' shards; pass --resume to continue or --overwrite")
        elif plan_file.exists() and json.loads(plan_file.read_text()) != plan:
            raise UsageError(f"--resume: {plan_file} was written with different inputs or options")
    for stale in out.glob(f".{prefix}-*.tar.tmp-*"):
        stale.unlink(missing_ok=True)
    plan_file.write_text(json.dumps(plan, indent=1, sort_keys=True))

    todo = [i for i in range(len(producers)) if not stats_path(out, prefix, i).exists()]
    tasks = [(str(out), prefix, i, producers[i]) for i in todo]
    bar = tqdm(total=samples_total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    done_before = len(producers) - len(todo)
    bar.set_postfix(skipped_shards=done_before)

    def account(stats):
        bar.update(stats["ok"] + sum(stats["failed"].values()))

    if workers > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(tasks)), maxtasksperchild=16) as pool:
            for stats in pool.imap_unordered(_run_task, tasks):
                account(stats)
    else:
        for task in tasks:
            account(_run_task(task))
    bar.close()
    return finalize(out, prefix, len(producers))


def finalize(out: Path, prefix: str, num_shards: int) -> dict:
    sizes, failed, ok, nbytes = {}, Counter(), 0, 0
    for i in range(num_shards):
        stats = json.loads(stats_path(out, prefix, i).read_text())
        sizes[stats["shard"]] = stats["ok"]
        failed.update(stats["failed"])
        ok += stats["ok"]
        nbytes += stats["bytes"]
    total = {"prefix": prefix, "shards": num_shards, "ok": ok, "failed": dict(sorted(failed.items())),
             "failed_total": sum(failed.values()), "bytes": nbytes}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1, sort_keys=True))
    (out / "stats.json").write_text(json.dumps(total, indent=1, sort_keys=True))
    return total


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def items_from_folder(root: Path, caption_col: str = "caption") -> list[Item]:
    """Images anywhere under ``root`` (sorted), caption from ``a.txt``, else field ``caption_col`` of ``a.json``."""
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in SOURCE_IMAGE_EXTS and p.is_file()):
        rel = path.relative_to(root).as_posix()
        extra: dict = {"source": rel}
        caption: str | bytes | None = None
        txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
        if js.exists():
            try:
                meta = json.loads(js.read_text(encoding="utf-8"))
                if isinstance(meta, dict):
                    extra.update({k: v for k, v in meta.items() if k != caption_col})
                    caption = meta.get(caption_col)
                    caption = None if caption is None else str(caption)
            except (ValueError, UnicodeDecodeError):
                pass
        if txt.exists():
            caption = txt.read_bytes()
        size = _file_size(path) + (len(caption) if caption else 0)
        items.append(Item(image=str(path), caption=caption, extra=extra, size_hint=size))
    return items


def _read_manifest_rows(path: Path) -> Iterable[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise UsageError(f"{path}:{lineno}: not valid JSON") from None
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading parquet manifests needs pyarrow: pip install pyarrow") from None
        yield from pq.read_table(path).to_pylist()
    else:
        raise UsageError(f"unknown manifest type {path.name}: use .jsonl, .csv, .tsv or .parquet")


def items_from_manifest(path: Path, image_col: str = "image", caption_col: str = "caption",
                        image_root: Path | None = None) -> list[Item]:
    root = image_root or path.parent
    items = []
    for i, row in enumerate(_read_manifest_rows(path)):
        if image_col not in row:
            raise UsageError(f"{path.name}: row {i} has no column '{image_col}' (use --image-col)")
        image = Path(str(row[image_col]))
        image = image if image.is_absolute() else root / image
        caption = row.get(caption_col)
        extra = {k: v for k, v in row.items() if k not in (caption_col,)}
        extra = json.loads(json.dumps(extra, default=str))
        caption = None if caption is None else str(caption)
        items.append(Item(image=str(image), caption=caption, extra=extra,
                          size_hint=_file_size(image) + len(caption or "")))
    return items


def shard_items(items: list[Item], out: str | Path, *, prefix: str = "data", samples_per_shard: int | None = 1000,
                bytes_per_shard: int | None = None, opts: EncodeOptions = EncodeOptions(), workers: int = 1,
                resume: bool = False, overwrite: bool = False, progress: bool = True, source_id: str = "",
                process: Callable[[Item, EncodeOptions], dict] = process_item, kind: str = "shard") -> dict:
    """Plan and write shards for ``items``; the library entry point behind ``data_tools shard``, ``import`` and
    ``llava``. ``process`` turns one item into its members (a module-level function: workers are spawned)."""
    if not items:
        raise UsageError("no input samples found")
    shards = plan_shards(items, samples_per_shard, bytes_per_shard)
    described = (lambda it: f"{it.image}|{it.caption!r}|{len(it.data or b'')}") if kind == "shard" else \
        (lambda it: f"{it.image}|{it.reject}|{json.dumps(it.extra, sort_keys=True)}")
    plan = {"kind": kind, "source": source_id, "options": asdict(opts), "samples_per_shard": samples_per_shard,
            "bytes_per_shard": bytes_per_shard, "num_shards": len(shards), "num_items": len(items),
            "fingerprint": fingerprint(described(it) for it in items)}
    producers = [functools.partial(produce_items, group, opts, process) for group in shards]
    return run_shards(out, prefix, producers, plan=plan, workers=workers, resume=resume, overwrite=overwrite,
                      progress=progress, samples_total=len(items))

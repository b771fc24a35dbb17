"""Reading shards safely: whitelisted members only, nothrow grouping, late decode with a header pixel cap.

Nothing read from a shard is ever unpickled or executed: members whose extension is not in :data:`WHITELIST` are
skipped from the tar stream without reading their data and counted as ``ignored_member``; a whitelisted member above
its size cap (``format.MAX_TEXT_BYTES`` / ``MAX_IMAGE_BYTES``, from the tar header) is not read either, and its
sample is dropped as ``too_large_text`` / ``too_large_image``. Every failure becomes a
counter bucket (see :data:`NON_ERRORS` for the buckets that do not count towards the error rate), never an
exception that ends the stream.
"""
from __future__ import annotations

import contextlib
import tarfile
from collections import Counter
from typing import Iterator

from PIL import Image
from webdataset.gopen import gopen

from ..commandline import UserError
from .format import (
    CAPTION_EXT,
    IMAGE_EXTS,
    JSON_EXT,
    MAX_IMAGE_BYTES,
    MAX_TEXT_BYTES,
    WHITELIST,
    BoundedTarInfo,
    SampleError,
    clean_caption,
    image_exts,
    load_image,
    member_too_large,
    open_image,
    open_tar_stream,
    pixel_limit,
    read_json,
    split_name,
    text_only,
    to_rgb,
)
from .transforms import decode_size_for

# Counter buckets that are not data errors: delivered samples (text_only: how many of them had no image), harmless
# extra members, make_example's own filter.
NON_ERRORS = frozenset({"ok", "ignored_member", "rejected", "text_only"})


class DataErrorRateExceeded(UserError, RuntimeError):
    """Too many bad samples: the shards are probably broken, and training on the rest would be silently biased."""


def is_url(url: str) -> bool:
    """A shard that is not a local path: ``pipe:CMD`` or ``scheme://...`` (http, https, gs, s3 via pipe, ...)."""
    url = str(url)
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def open_shard(url: str):
    """A readable binary stream: a local path or ``file://`` through plain ``open``; ``pipe:CMD`` or a URL through
    webdataset's own opener (``webdataset.gopen``: ``pipe:`` runs the command, http(s) runs curl; a failing command
    or HTTP error surfaces as OSError when the stream is read or closed)."""
    url = str(url)
    if not is_url(url):  # a local file, always opened as one: `file://pipe:...` names a file, it never runs
        return open(url[len("file://"):] if url.startswith("file://") else url, "rb")
    return gopen(url, "rb")


class CountingReader:
    """A read-only stream that counts the bytes read through it (a stream has no size to check a tar against)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.n += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 20):
            pass
        return self.n

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iter_tar_samples(url: str, stats: Counter, max_text_bytes: int = MAX_TEXT_BYTES,
                     max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one shard (any :func:`open_shard` URL).

    A repeated extension starts a new sample (open_clip's nothrow grouping) instead of raising. A truncated or
    unreadable tar ends the shard (``truncated_tar`` / ``unreadable_shard``); the sample being assembled when the
    data ran out is dropped, the ones before it are kept. A member above its size cap is passed over unread and its
    sample dropped (``too_large_text`` / ``too_large_image``), so memory per sample is bounded by the caps.
    (webdataset's own ``tar_file_iterator`` is not used: it reads every member's data and raises on the first bad
    one, where this skips non-whitelisted and over-size members unread and counts every failure by reason.)
    """
    try:
        f = CountingReader(open_shard(url))
    except (OSError, ValueError):
        stats["unreadable_shard"] += 1
        return
    cur: dict | None = None

    def done(sample: dict) -> Iterator[dict]:
        if "__skip__" in sample:
            stats[sample["__skip__"]] += 1
        else:
            yield sample

    try:
        with contextlib.closing(f), open_tar_stream(f) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if ext not in WHITELIST:
                    stats["ignored_member"] += 1  # never read, never unpickled
                    continue
                if cur is None or cur["__key__"] != key or ext in cur:
                    if cur is not None:
                        yield from done(cur)
                    cur = {"__key__": key, "__url__": url}
                too_large = member_too_large(ext, info.size, max_text_bytes, max_image_bytes)
                if too_large or "__skip__" in cur:  # over its cap: passed over unread, the sample is dropped
                    cur.setdefault("__skip__", too_large)
                    cur[ext] = None
                    continue
                cur[ext] = tar.extractfile(info).read()
            # tarfile treats a header cut in half as the end of the archive; a complete tar is followed by two
            # zero blocks, so a file that ends before them was truncated and its last sample may be incomplete.
            if f.drain() < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("missing end-of-archive blocks")
    except (tarfile.TarError, EOFError, OSError, ValueError):
        stats["truncated_tar" if cur is not None else "unreadable_shard"] += 1
        return
    if cur is not None:
        yield from done(cur)


def decode_sample(raw: dict, max_pixels: int = 128_000_000, decode_size: tuple[int, int] | None = None,
                  resize_mode: str = "crop") -> dict:
    """Raw members -> ``{"__key__", "image": RGB PIL, "text": str | None, "json": dict | None}``; raises SampleError.
    A text-only conversation (no image member, :func:`.format.text_only`) comes back with ``"image": None``.

    The pixel cap is checked from the header (``Image.open`` reads only that) before ``load()``
    (:func:`.format.open_image`, the writer's rule); ``decode_size``
    = (H, W) lets JPEGs decode at a reduced DCT scale that still covers what ``fit_image`` with ``resize_mode``
    resamples (``Image.draft``): the cover size for ``crop``, the letterboxed size for ``pad``, (H, W) for
    ``stretch``.
    """
    images = image_exts(raw)
    if not images:
        try:  # a text-only conversation has no image ("image": None); anything else needs one
            meta = read_json(raw[JSON_EXT]) if JSON_EXT in raw else None
        except SampleError:
            meta = None
        if not text_only(meta):
            raise SampleError("missing_image")
        text = clean_caption(raw[CAPTION_EXT]) if CAPTION_EXT in raw else None
        return {"__key__": raw["__key__"], "image": None, "text": text, "json": meta}
    ext = images[0]
    text = clean_caption(raw[CAPTION_EXT]) if CAPTION_EXT in raw else None
    meta = read_json(raw[JSON_EXT]) if JSON_EXT in raw else None
    image = decode_pil(open_image(raw[ext], max_pixels), decode_size, resize_mode, max_pixels)
    return {"__key__": raw["__key__"], "image": image, "text": text, "json": meta}


def decode_pil(img: Image.Image, decode_size: tuple[int, int] | None = None, resize_mode: str = "crop",
               max_pixels: int = 128_000_000) -> Image.Image:
    """An opened image whose pixels are not yet decoded -> 8-bit RGB (:func:`.format.to_rgb`), decoded under
    ``pixel_limit(max_pixels)``; a failure is a SampleError (:func:`.format.load_image`'s reasons, ``unreadable``).
    ``decode_size`` = (H, W): a JPEG decodes at the reduced DCT scale that still covers what ``fit_image`` with
    ``resize_mode`` resamples (``Image.draft``, see :func:`decode_sample`). What :func:`decode_sample` does to a
    shard's image and ``ett_ds.eval.lmms`` to lmms-eval's (a lazily opened file)."""
    with pixel_limit(max_pixels):
        if decode_size is not None and img.format == "JPEG" and getattr(img, "tile", None):
            img.draft("RGB", decode_size_for(*img.size, decode_size, resize_mode))
        load_image(img)
    try:
        return to_rgb(img)
    except Exception:  # noqa: BLE001 - a mode Pillow cannot convert is one bad sample
        raise SampleError("unreadable") from None


def error_count(totals: Counter | dict) -> int:
    return sum(v for k, v in totals.items() if k not in NON_ERRORS)


def check_error_rate(totals: Counter | dict, max_error_rate: float, min_samples: int, where: str = "") -> None:
    errors = error_count(totals)
    seen = errors + totals.get("ok", 0)
    if seen >= min_samples and errors > max_error_rate * seen:
        reasons = {k: v for k, v in sorted(totals.items()) if k not in NON_ERRORS}
        raise DataErrorRateExceeded(
            f"data error rate {errors}/{seen} = {errors / seen:.3f} exceeds max_error_rate={max_error_rate}"
            f"{' in ' + where if where else ''}; errors by reason: {reasons}")
    rejected = totals.get("rejected", 0)
    if rejected >= 10 * max(min_samples, 1) and rejected > 0.99 * (rejected + totals.get("ok", 0)):
        raise DataErrorRateExceeded(f"make_example rejected {rejected} of {rejected + totals.get('ok', 0)} "
                                    f"samples{' in ' + where if where else ''}; the stream would never yield")


def count_samples(url: str) -> int:
    """Samples with an image member in one shard, from the tar headers only (seeks over the data of a local file;
    a ``pipe:`` or remote shard is streamed once)."""
    keys: set[str] = set()
    try:
        with (tarfile.open(url, mode="r:", tarinfo=BoundedTarInfo) if not is_url(url) else
              open_tar_stream(open_shard(url))) as tar:
            for info in tar:
                key, ext = split_name(info.name)
                if info.isfile() and ext in IMAGE_EXTS:
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)

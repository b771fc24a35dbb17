"""The shard format in one place: what ``data_tools`` writes and ``ett_ds.data`` reads.

A shard is a tar of samples. The members of a sample share a key (WebDataset's rule, :func:`split_name`: the path
up to the first '.' of the basename; the rest is the extension): one image (:data:`IMAGE_EXTS`; none for a
text-only conversation, :func:`text_only`), optionally a
caption (``KEY.txt``, UTF-8) and a json object (``KEY.json``; its ``caption`` or ``text`` field is the caption of
a sample without a ``txt``, and ``task`` / ``conversations`` choose the layout, see ``ett_ds/data/batch.py``).
Members with any other extension are never read (:data:`WHITELIST`). Keys written by ett_ds's tools contain no
'.' or '/' (:func:`key_problem`), so they split back to themselves.

Nothing is read into memory before its size is checked: a text member above :data:`MAX_TEXT_BYTES` or an image
member above :data:`MAX_IMAGE_BYTES` (the tar header gives the size) drops its sample unread
(:func:`member_too_large`: ``too_large_text`` / ``too_large_image``), and a tar whose long-name or pax header claims
more than :data:`MAX_HEADER_BYTES` is refused (:func:`open_tar_stream`).

Every reason a sample cannot be used -- while writing, verifying or training -- is a :class:`SampleError` whose
``reason`` is the stats bucket it is counted in. An image is opened the same way on both sides (:func:`open_image`:
the pixel count from the header is checked before anything decodes, ``max_pixels`` being the one limit;
:func:`load_image`), and images of every Pillow mode become 8-bit RGB the same way (:func:`normalize_image`; the
writer may keep 8-bit grey).
"""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
import warnings

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
JSON_EXT = "json"
TEXT_EXTS = (CAPTION_EXT, JSON_EXT)
WHITELIST = frozenset(IMAGE_EXTS + TEXT_EXTS)  # the members the loader reads; nothing else is read or copied
CAPTION_FIELDS = ("caption", "text")  # json fields holding the caption of a sample without a txt member
IMAGE_MARK = "<image>"  # where a conversation's image goes
# a conversation turn's role ("from" / "role") -> the chat template's role
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Size caps, checked from the tar header before a member is read (every reader: training, evaluation, verify,
# instruct). A caption or conversation json is KBs (LLaVA's longest rows are tens of KB; sft cuts conversations at
# data.max_chat_tokens anyway), a shard image MBs; past these a sample is hostile or broken, and reading it could
# exhaust memory (a shuffle buffer holds many samples).
MAX_TEXT_BYTES = 1 << 20     # txt and json members
MAX_IMAGE_BYTES = 64 << 20   # image members (the pixel cap, max_pixels, bounds the decode separately)
MAX_HEADER_BYTES = 1 << 20   # GNU long names and pax headers, which tarfile reads whole

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = (255, 255, 255)  # what transparency is composited on (stamps / clip-art are cut-outs)


class SampleError(Exception):
    """A sample that is skipped; ``reason`` is the stats bucket it is counted in."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def well_formed_conversation(conversations) -> bool:
    """A non-empty list of turns, each a dict whose role and content are strings."""
    if not isinstance(conversations, list) or not conversations:
        return False
    for turn in conversations:
        if not isinstance(turn, dict):
            return False
        role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(content, str):
            return False
    return True


def text_only(meta: dict | None) -> bool:
    """Whether a sample without an image member is a text-only conversation (an sft sample that needs no image): its
    json holds a non-empty ``conversations`` list and no turn carries :data:`IMAGE_MARK`."""
    conv = meta.get("conversations") if isinstance(meta, dict) else None
    return isinstance(conv, list) and bool(conv) and not any(
        isinstance(t, dict) and IMAGE_MARK in str(t.get("value", t.get("content", ""))) for t in conv)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key rule: key = path up to the first '.' of the basename, ext = the rest (lower case)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key of a written shard (None when it can): it must be non-empty and hold no
    '.' or '/', so that :func:`split_name` gives it back and it names no folder."""
    if not key:
        return "empty sample key"
    if "." in key or "/" in key:
        return f"sample key must not contain '.' or '/': {key!r}"
    return None


def member_too_large(ext: str, size: int, max_text_bytes: int = MAX_TEXT_BYTES,
                     max_image_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """The reason a whitelisted member of ``size`` bytes is not read (``too_large_text`` / ``too_large_image``), or
    None when it is within its cap."""
    if ext in IMAGE_EXTS:
        return "too_large_image" if size > max_image_bytes else None
    return "too_large_text" if size > max_text_bytes else None


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses (``tarfile.ReadError``, i.e. an unreadable / truncated shard) a GNU long-name or pax
    header above :data:`MAX_HEADER_BYTES`: tarfile reads those headers' data whole, before any member."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"tar header of {self.size} bytes (cap {MAX_HEADER_BYTES})")
        return super()._proc_member(tarfile_)


def open_tar_stream(fileobj=None, name=None) -> tarfile.TarFile:
    """A tar read as a stream (``r|``: members in order, skipped ones are passed over without being kept) with
    header sizes capped; member sizes are the caller's to check (:func:`member_too_large`) before reading."""
    return tarfile.open(name=name, fileobj=fileobj, mode="r|", tarinfo=BoundedTarInfo)


def image_exts(members) -> list[str]:
    """The image extensions among ``members`` (a dict or a collection of extensions), in :data:`IMAGE_EXTS` order."""
    return [e for e in IMAGE_EXTS if e in members]


def clean_caption(caption: str | bytes) -> str:
    """A caption (a txt member's bytes, or a string) stripped; raises ``non_utf8_caption`` / ``empty_caption``."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError("non_utf8_caption") from None
    caption = caption.strip()
    if not caption:
        raise SampleError("empty_caption")
    return caption


def read_json(data: bytes) -> dict:
    """A json member; raises ``bad_json`` when it is not valid JSON or not an object."""
    try:
        meta = json.loads(data)
    except ValueError:
        raise SampleError("bad_json") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json")
    return meta


def json_caption(meta: dict):
    """The first non-empty :data:`CAPTION_FIELDS` field of a json object, as stored (it may not be a string)."""
    value = None
    for field in CAPTION_FIELDS:
        value = meta.get(field)
        if value:
            break
    return value


def sample_caption(text: str | None, meta: dict) -> str | None:
    """The caption of a sample: its txt member (``text``, read by :func:`clean_caption`), else
    :func:`json_caption`; raises ``bad_json`` when that field is not a string."""
    if text is None:
        text = json_caption(meta)
    if text is not None and not isinstance(text, str):
        raise SampleError("bad_json")
    return text


def load_failure_reason(e: OSError) -> str:
    """``truncated`` for Pillow's truncation errors, whatever their case ("image file is truncated", "Truncated
    File Read"); ``unreadable`` otherwise."""
    return "truncated" if "truncated" in str(e).lower() else "unreadable"


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb limit raised to at least ``max_pixels`` (and its warning silenced) for the
    duration: ``max_pixels`` is the one limit, so an image Pillow refuses as a bomb (more than twice its limit)
    is always also above ``max_pixels``, i.e. ``too_large``."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, before or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count before anything decodes; raises ``too_large`` /
    ``unreadable``. Decode it with :func:`load_image` inside ``pixel_limit(max_pixels)``."""
    with pixel_limit(max_pixels):
        try:
            img = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError:
            raise SampleError("too_large") from None
        except Exception:  # noqa: BLE001 - UnidentifiedImageError, OSError, a plugin's parser: one bad sample
            raise SampleError("unreadable") from None
    w, h = img.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise SampleError("too_large")
    return img


def load_image(img: Image.Image) -> None:
    """Decode fully; a failure is a SampleError (truncated, too_large, unreadable), never an exception that escapes."""
    try:
        img.load()
    except OSError as e:
        raise SampleError(load_failure_reason(e)) from None
    except Image.DecompressionBombError:
        raise SampleError("too_large") from None
    except Exception:  # noqa: BLE001 - any decoder failure is a bad sample, never a crash
        raise SampleError("unreadable") from None


def normalize_image(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """8-bit RGB (or 8-bit grey ``L`` when ``keep_gray`` and the image is grey), from any Pillow mode.

    Transparency (alpha, premultiplied alpha, a palette's transparent colour) is composited on white; 16- and
    32-bit grey is scaled to 8 bits (a plain conversion would clip it to white); everything else converts.
    """
    if img.mode == "RGB" or (keep_gray and img.mode == "L"):
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        if img.mode == "La":  # premultiplied: Pillow converts it to LA only
            img = img.convert("LA")
        img = img.convert("RGBA")
        base = Image.new("RGB", img.size, BACKGROUND)
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = img.convert("I").point(lambda v: v / 256).convert("L")
        if keep_gray:
            return img
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, what the tokenizer is fed (:func:`normalize_image`)."""
    return normalize_image(img)

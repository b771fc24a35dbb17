"""``data_tools llava``: LLaVA-format conversations -> SFT shards the ``sft`` stage reads.

Input: LLaVA's instruction-tuning JSON (a list, or JSONL with one row per line) of
``{"id", "image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``; image paths are relative to ``--image-root`` (default: the JSON's folder).

Each usable row becomes one sample: the image (validated / re-encoded like ``data_tools shard``) and a json with
the row as it is -- ``id``, every turn of ``conversations`` (the ``<image>`` mark where the row put it), the other
fields -- plus ``"task": "sft"``, ``width``, ``height`` (``image`` keeps the source path). The sft stage
(``ett_ds/data/batch.py``) replaces the ``<image>`` mark with the image tokens and supervises every assistant turn.
A text-only row (no ``image``, no ``<image>`` mark; about 40k of llava_v1_5_mix665k's rows) becomes a sample with
the json alone; the sft stage trains it as plain text (``stats.json``: ``text_only`` counts them among ``ok``).

Rows the stage cannot train on are skipped and counted by reason in ``stats.json`` (``failed``), like every
``data_tools shard`` failure: ``bad_id`` (no id, or not a string/number), ``duplicate_id`` (the first row with an
id is kept), ``bad_conversations`` (not the stage's format: a non-empty list of turns with string role and content,
roles human/gpt/user/assistant/system, at least one assistant turn, at most one ``<image>``, only in a user or
system turn), ``no_image`` (an ``<image>`` mark but no image), ``multiple_images`` (an image list: one image
per conversation is supported), ``too_large_text`` (the sample's json would pass the loader's cap,
``format.MAX_TEXT_BYTES``), ``missing_image`` (the file does not exist), and the image checks of ``shard``
(``unreadable``, ``truncated``, ``too_small``, ``too_large``).

Only regular files inside ``--image-root`` are read, and at most :data:`MAX_SOURCE_BYTES` of them: an absolute
path, a ``..`` path or a symlink that leads out of the root is ``outside_root``, anything but a regular file (a
FIFO, a device such as ``/dev/zero``, a directory) is ``not_a_file``, a file above the cap is ``too_large_file``;
none of them is opened for reading (the checks are repeated on the open file: no symlink as the last component,
``fstat`` before a bounded read).

    python -m data_tools llava llava_v1_5_mix665k.json --image-root /data/llava --out /data/llava_sft
"""
from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

from ett_ds.data.format import (
    IMAGE_MARK,
    MAX_IMAGE_BYTES,
    MAX_TEXT_BYTES,
    ROLES,
    SampleError,
    text_only,
    well_formed_conversation,
)

from .errors import UsageError
from .shard import EncodeOptions, Item, encode_image, shard_items
from .tario import json_bytes

MAX_SOURCE_BYTES = MAX_IMAGE_BYTES  # a source image above this is not read (too_large_file); shards cap images alike
SFT_FIELDS = {"task": "sft", "width": 0, "height": 0}  # what a sample's json adds to its row (for its size check)


def read_rows(path: Path) -> list:
    """The rows of a LLaVA JSON list or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UsageError(f"{path}:{lineno}: not valid JSON (expected a JSON list or JSONL)") from None
    return rows


def conversation_problem(conversations) -> str | None:
    """None when the sft stage can train on ``conversations``, else why not (one line)."""
    if not well_formed_conversation(conversations):
        return "not a non-empty list of turns with string from/value"
    roles = [ROLES.get(str(t.get("from", t.get("role", ""))).lower()) for t in conversations]
    if None in roles:
        return "unknown role"
    if "assistant" not in roles:
        return "no assistant turn"
    marks = [(role, str(t.get("value", t.get("content", ""))).count(IMAGE_MARK)) for role, t in zip(roles, conversations)]
    if sum(n for _, n in marks) > 1:
        return f"more than one {IMAGE_MARK}"
    if any(n and role == "assistant" for role, n in marks):
        return f"{IMAGE_MARK} in an assistant turn"
    return None


def resolve_image(image: str, root: Path) -> Path:
    """The real path of a row's image, which must lie inside ``root`` (itself resolved); raises ``outside_root``
    for an absolute path, or a ``..`` or symlink that leads out of it."""
    if Path(image).is_absolute():
        raise SampleError("outside_root")
    real = (root / image).resolve()
    if not real.is_relative_to(root):
        raise SampleError("outside_root")
    return real


def check_file(st: os.stat_result, max_bytes: int) -> None:
    """A regular file of at most ``max_bytes``: ``not_a_file`` (FIFO, device, directory...) / ``too_large_file``."""
    if not stat.S_ISREG(st.st_mode):
        raise SampleError("not_a_file")
    if st.st_size > max_bytes:
        raise SampleError("too_large_file")


def read_image_file(path: str, max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """The bytes of an image :func:`llava_items` resolved inside the root, checked again (it may have changed
    since): still its own real path (no symlink on the way), a regular file within ``max_bytes`` by ``fstat`` on
    the open file, at most ``max_bytes + 1`` bytes read. Raises SampleError."""
    if os.path.realpath(path) != path:
        raise SampleError("outside_root")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SampleError("missing_image") from None
    except OSError:  # ELOOP: the path became a symlink
        raise SampleError("unreadable") from None
    with os.fdopen(fd, "rb") as f:
        check_file(os.fstat(f.fileno()), max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SampleError("too_large_file")
    return data


def llava_items(rows: list, image_root: Path, max_bytes: int = MAX_SOURCE_BYTES) -> list[Item]:
    """One Item per row, in order; rows that cannot train carry their reason in ``reject``. Image paths are
    resolved inside ``image_root`` and checked with ``stat`` only (nothing is opened here)."""
    image_root = Path(image_root).resolve()
    items, seen = [], set()
    for row in rows:
        reject = None
        if not isinstance(row, dict):
            row, reject = {"row": row}, "bad_row"
        rid = row.get("id")
        image = row.get("image")
        if reject:
            pass
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            reject = "bad_id"
        elif str(rid) in seen:
            reject = "duplicate_id"
        elif conversation_problem(row.get("conversations")) is not None:
            reject = "bad_conversations"
        elif image is None or image == "":  # text-only: trains as is; an <image> mark without an image cannot
            reject = "no_image" if not text_only(row) else None
        elif isinstance(image, list):
            reject = "multiple_images"
        elif not isinstance(image, str):
            reject = "bad_row"
        if reject not in ("bad_id", "bad_row"):
            seen.add(str(rid))
        path, size = None, 0
        if reject is None and image:
            try:
                real = resolve_image(image, image_root)
                st = os.stat(real)
                check_file(st, max_bytes)
                path, size = str(real), st.st_size
            except SampleError as e:
                reject = e.reason
            except FileNotFoundError:
                reject = "missing_image"
            except (OSError, ValueError):  # a loop of symlinks, a NUL in the name
                reject = "unreadable"
        extra = json.loads(json.dumps(row, default=str))
        if reject is None and len(json_bytes({**extra, **SFT_FIELDS})) > MAX_TEXT_BYTES:
            reject = "too_large_text"  # the loader would skip its json unread
        items.append(Item(image=path, extra=extra, size_hint=size, reject=reject))
    return items


def process_llava(item: Item, opts: EncodeOptions, max_bytes: int = MAX_SOURCE_BYTES) -> dict[str, bytes]:
    """One LLaVA row -> {image ext: bytes, "json": the row + task/width/height}; raises SampleError."""
    if item.reject:
        raise SampleError(item.reject)
    if item.image is None:  # a text-only conversation: the json alone
        return {"json": json_bytes({**item.extra, "task": "sft"})}
    ext, data, (w, h) = encode_image(read_image_file(item.image, max_bytes), opts)
    meta = dict(item.extra)
    meta.update({"task": "sft", "width": w, "height": h})
    return {ext: data, "json": json_bytes(meta)}


def llava_to_shards(path: str | Path, out: str | Path, *, image_root: str | Path | None = None,
                    prefix: str = "llava", samples_per_shard: int = 1000, opts: EncodeOptions = EncodeOptions(),
                    max_image_bytes: int = MAX_SOURCE_BYTES, **kwargs) -> dict:
    """Shard a LLaVA JSON/JSONL; returns the total stats (``ok``, ``failed`` by reason)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"input not found: {path}")
    root = (Path(image_root) if image_root else path.parent).resolve()
    if not root.is_dir():
        raise UsageError(f"--image-root {root}: not a directory")
    rows = read_rows(path)
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"{path}: expected a non-empty JSON list of conversations (LLaVA format)")
    items = llava_items(rows, root, max_image_bytes)
    process = functools.partial(process_llava, max_bytes=max_image_bytes)
    total = shard_items(items, out, prefix=prefix, samples_per_shard=samples_per_shard, opts=opts,
                        source_id=f"llava:{path.resolve()}:{root}", process=process, kind="llava", **kwargs)
    # of the ok samples, how many are text-only (they cannot fail once planned: no image, json within its cap)
    total["text_only"] = sum(1 for it in items if it.image is None and it.reject is None)
    (Path(out) / "stats.json").write_text(json.dumps(total, indent=1, sort_keys=True))
    return total


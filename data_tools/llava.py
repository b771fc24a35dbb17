"""``data_tools llava``: LLaVA-format conversations -> SFT shards the ``sft`` stage reads.

Input: LLaVA's instruction-tuning JSON (a list, or JSONL with one row per line) of
``{"id", "image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``; image paths are relative to ``--image-root`` (default: the JSON's folder).

Each usable row becomes one sample: the image (validated / re-encoded like ``data_tools shard``) and a json with
the row as it is -- ``id``, every turn of ``conversations`` (the ``<image>`` mark where the row put it), the other
fields -- plus ``"task": "sft"``, ``width``, ``height`` (``image`` keeps the source path). The sft stage
(``ett_ds/data/batch.py``) replaces the ``<image>`` mark with the image tokens and supervises every assistant turn.

Rows the stage cannot train on are skipped and counted by reason in ``stats.json`` (``failed``), like every
``data_tools shard`` failure: ``bad_id`` (no id, or not a string/number), ``duplicate_id`` (the first row with an
id is kept), ``bad_conversations`` (not the stage's format: a non-empty list of turns with string role and content,
roles human/gpt/user/assistant/system, at least one assistant turn, at most one ``<image>``, only in a user or
system turn), ``no_image`` (a text-only row: the sft stage always feeds an image, so these cannot train),
``multiple_images`` (an image list: one image per conversation), ``missing_image`` (the file does not exist), and the
image checks of ``shard`` (``unreadable``, ``truncated``, ``too_small``, ``too_large``).

    python -m data_tools llava llava_v1_5_mix665k.json --image-root /data/llava --out /data/llava_sft
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .shard import EncodeOptions, Item, encode_image, read_source, shard_items
from .tario import json_bytes


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
    from ett_ds.data.batch import IMAGE_MARK, ROLES, _well_formed  # the stage's own rules
    if not _well_formed(conversations):
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


def llava_items(rows: list, image_root: Path) -> list[Item]:
    """One Item per row, in order; rows that cannot train carry their reason in ``reject``."""
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
        elif image is None or image == "":
            reject = "no_image"
        elif isinstance(image, list):
            reject = "multiple_images"
        elif not isinstance(image, str):
            reject = "bad_row"
        if reject not in ("bad_id", "bad_row"):
            seen.add(str(rid))
        path = None
        if reject is None:
            p = Path(image)
            path = str(p if p.is_absolute() else image_root / p)
        extra = json.loads(json.dumps(row, default=str))
        size = Path(path).stat().st_size if path and Path(path).is_file() else 0
        items.append(Item(image=path, extra=extra, size_hint=size, reject=reject))
    return items


def process_llava(item: Item, opts: EncodeOptions) -> dict[str, bytes]:
    """One LLaVA row -> {image ext: bytes, "json": the row + task/width/height}; raises SampleError."""
    ext, data, (w, h) = encode_image(read_source(item), opts)
    meta = dict(item.extra)
    meta.update({"task": "sft", "width": w, "height": h})
    return {ext: data, "json": json_bytes(meta)}


def llava_to_shards(path: str | Path, out: str | Path, *, image_root: str | Path | None = None,
                    prefix: str = "llava", samples_per_shard: int = 1000, opts: EncodeOptions = EncodeOptions(),
                    **kwargs) -> dict:
    """Shard a LLaVA JSON/JSONL; returns the total stats (``ok``, ``failed`` by reason)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"input not found: {path}")
    root = Path(image_root) if image_root else path.parent
    rows = read_rows(path)
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"{path}: expected a non-empty JSON list of conversations (LLaVA format)")
    items = llava_items(rows, root)
    return shard_items(items, out, prefix=prefix, samples_per_shard=samples_per_shard, opts=opts,
                       source_id=f"llava:{path.resolve()}:{root.resolve()}", process=process_llava, kind="llava",
                       **kwargs)


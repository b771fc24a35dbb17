"""``data_tools instruct``: caption shards -> instruction (SFT) shards, from question templates.

Every sample with a caption (``.txt``, else ``json["caption"]``/``json["text"]``: the loader's rule) gets a
LLaVA-style conversation in its json, ``[{"from": "human", "value": "<image>\\nQUESTION"}, {"from": "gpt",
"value": CAPTION}]`` plus ``"task": "sft"``; the image and the other json fields are copied unchanged. The question
is drawn from the templates by a hash of (seed, shard name, sample key), so the output is byte-identical for
identical input. One output shard per input shard, same name, plus ``sizes.json``.

Nothing unchecked is copied: only whitelisted members (jpg, jpeg, png, webp, txt, json; anything else, e.g. a
``.pth``, is never read and is counted as ``ignored_member``) reach the output, and a sample is dropped and counted
by reason when its key cannot be a shard key (``bad_key``: contains '/'; ``duplicate_key``), when it has no image
(``missing_image``) or an image that does not fully decode (``unreadable``, ``truncated``, ``too_large`` above
``--max-pixels``), a member over its size cap (``too_large_text`` above ``--max-text-bytes``, ``too_large_image``
above ``--max-image-bytes``: never read), or when its caption or json is unusable (``missing_caption``,
``empty_caption``, ``non_utf8_caption``, ``bad_json``: the reasons the training loader counts).

The questions are a built-in set (``--questions describe``, the default, for general captions; ``--questions ocr``
for images of text) or one's own (``--templates FILE``).

    python -m data_tools.instruct --in data/demo/train --out data/demo_sft --questions ocr [--seed 0]
"""
from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

from ett_ds.commandline import run_cli
from ett_ds.data.format import (
    CAPTION_EXT,
    JSON_EXT,
    MAX_IMAGE_BYTES,
    MAX_TEXT_BYTES,
    WHITELIST,
    SampleError,
    clean_caption,
    image_exts,
    key_problem,
    load_image,
    member_too_large,
    open_image,
    open_tar_stream,
    pixel_limit,
    read_json,
    sample_caption,
    split_name,
)

from .errors import Parser, UsageError
from .tario import ShardTarWriter, json_bytes

QUESTIONS = {  # --questions: the built-in question sets
    "describe": (  # general captions (the default): what a captioned photo or drawing is asked
        "Describe the image.",
        "What is in this image?",
        "Write a short caption for this image.",
        "What does this picture show?",
        "Give a brief description of the image.",
    ),
    "ocr": (  # images of text (synth-text, the demo data, documents)
        "What is written in the image?",
        "Read the text in the image.",
        "What does the image say?",
        "Transcribe the image.",
        "What text does the image contain?",
    ),
}


def read_samples(path: Path, stats: Counter | None = None, max_text_bytes: int = MAX_TEXT_BYTES,
                 max_image_bytes: int = MAX_IMAGE_BYTES):
    """(key, {ext: bytes}) in file order; members of one sample are adjacent (WebDataset's key rule), a repeated
    extension starts a new sample. Members outside the whitelist are skipped unread (counted in ``stats``); a
    sample with a member over its size cap is dropped without reading it (``too_large_text`` /
    ``too_large_image`` in ``stats``), so memory stays bounded by the caps."""
    stats = Counter() if stats is None else stats
    key, members, skip = None, {}, None
    with open(path, "rb") as f, open_tar_stream(f) as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if ext not in WHITELIST:
                stats["ignored_member"] += 1
                continue
            if members and (k != key or ext in members):
                if skip:
                    stats[skip] += 1
                else:
                    yield key, members
                members, skip = {}, None
            key = k
            skip = skip or member_too_large(ext, info.size, max_text_bytes, max_image_bytes)
            members[ext] = None if skip else tar.extractfile(info).read()
    if members:
        if skip:
            stats[skip] += 1
        else:
            yield key, members


def caption_of(members: dict) -> tuple[str | None, dict]:
    """(caption or None, json dict) as the training loader reads them (``ett_ds.data.format``); raises SampleError
    for json that is not an object, a caption field that is not a string, or an empty or non-UTF-8 txt."""
    meta = read_json(members[JSON_EXT]) if JSON_EXT in members else {}
    text = sample_caption(clean_caption(members[CAPTION_EXT]) if CAPTION_EXT in members else None, meta)
    return (text.strip() or None) if text else None, meta


def check_images(members: dict, max_pixels: int) -> None:
    """Every image member decodes completely (header pixel count first); at least one exists."""
    images = image_exts(members)
    if not images:
        raise SampleError("missing_image")
    with pixel_limit(max_pixels):
        for ext in images:
            load_image(open_image(members[ext], max_pixels))


def pick(templates: list[str], seed: int, *parts: str) -> str:
    h = hashlib.sha256("\x00".join([str(seed), *parts]).encode()).digest()
    return templates[int.from_bytes(h[:8], "big") % len(templates)]


def convert_sample(key: str, members: dict, templates: list[str], seed: int, shard: str,
                   max_pixels: int) -> dict:
    """One caption sample -> its SFT members; raises SampleError with the reason it is dropped."""
    if key_problem(key):
        raise SampleError("bad_key")
    text, meta = caption_of(members)
    if text is None:
        raise SampleError("missing_caption")
    check_images(members, max_pixels)
    question = pick(templates, seed, shard, key)
    meta = {**meta, "caption": text, "task": "sft", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": text}]}
    out = {k: v for k, v in members.items() if k not in (JSON_EXT, CAPTION_EXT)}
    out[JSON_EXT] = json_bytes(meta)
    return out


def convert_shard(src: Path, dst: Path, templates: list[str], seed: int,
                  max_pixels: int = 128_000_000, max_text_bytes: int = MAX_TEXT_BYTES,
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> Counter:
    stats: Counter = Counter()
    seen: set[str] = set()
    with ShardTarWriter(dst) as writer:
        for key, members in read_samples(src, stats, max_text_bytes, max_image_bytes):
            try:
                if key in seen:
                    raise SampleError("duplicate_key")
                out = convert_sample(key, members, templates, seed, src.name, max_pixels)
                if len(out[JSON_EXT]) > max_text_bytes:  # the caption is stored twice: keep it readable
                    raise SampleError("too_large_text")
            except SampleError as e:
                stats[e.reason] += 1
                continue
            except (RecursionError, MemoryError, ValueError, TypeError) as e:  # one sample, never the whole shard
                stats[f"error:{type(e).__name__}"] += 1
                continue
            seen.add(key)
            writer.write(key, out)
            stats["ok"] += 1
    return stats


def _main(argv: list[str]) -> int:
    ap = Parser(prog="data_tools instruct", description=__doc__)  # defaults shown in --help
    ap.add_argument("--in", dest="inp", required=True, help="a folder of .tar shards or one .tar")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--questions", choices=sorted(QUESTIONS), default="describe",
                    help="built-in question set: describe (general captions) or ocr (images of text)")
    ap.add_argument("--templates", help="a text file, one question per line (replaces --questions)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the question choice")
    ap.add_argument("--max-pixels", type=int, default=128_000_000, help="w*h above N -> too_large")
    ap.add_argument("--max-text-bytes", type=int, default=MAX_TEXT_BYTES,
                    help="a txt/json member above N bytes is not read; its sample -> too_large_text")
    ap.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                    help="an image member above N bytes is not read; its sample -> too_large_image")
    args = ap.parse_args(argv)
    src = Path(args.inp)
    shards = sorted(src.glob("*.tar")) if src.is_dir() else [src]
    if not shards or not all(s.is_file() for s in shards):
        raise UsageError(f"--in {src}: no .tar shards found")
    templates = list(QUESTIONS[args.questions])
    if args.templates:
        try:
            templates = [t.strip() for t in Path(args.templates).read_text().splitlines() if t.strip()]
        except OSError as e:
            raise UsageError(f"--templates {args.templates}: {e.strerror}") from None
        if not templates:
            raise UsageError(f"--templates {args.templates}: no questions in the file")
    out = Path(args.out)
    if out.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise UsageError("--out must differ from the input folder")
    out.mkdir(parents=True, exist_ok=True)
    total: Counter = Counter()
    sizes = {}
    for shard in shards:
        try:
            stats = convert_shard(shard, out / shard.name, templates, args.seed, args.max_pixels,
                                  args.max_text_bytes, args.max_image_bytes)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UsageError(f"{shard}: unreadable tar ({e})") from None
        sizes[shard.name] = stats["ok"]
        total += stats
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1, sort_keys=True))
    print(json.dumps({"shards": len(shards), **dict(sorted(total.items()))}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

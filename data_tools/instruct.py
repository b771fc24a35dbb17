"""``data_tools instruct``: caption shards -> instruction (SFT) shards, from question templates.

Every sample with a caption (``json["caption"]``/``json["text"]`` or ``.txt``) gets a LLaVA-style conversation in its
json, ``[{"from": "human", "value": "<image>\\nQUESTION"}, {"from": "gpt", "value": CAPTION}]`` plus
``"task": "sft"``; the image and the other json fields are copied unchanged. The question is drawn from the templates
by a hash of (seed, shard name, sample key), so the output is byte-identical for identical input. One output shard
per input shard, same name; samples without a caption are dropped and counted.

    python -m data_tools.instruct --in data/demo/train --out data/demo_sft [--templates FILE] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

from .errors import UsageError
from .tario import ShardTarWriter, json_bytes

DEFAULT_TEMPLATES = (
    "What is written in the image?",
    "Read the text in the image.",
    "Describe the image.",
    "What does the image say?",
    "Transcribe the image.",
)


def read_samples(path: Path):
    """(key, {ext: bytes}) in file order; members of one sample are adjacent (WebDataset's key rule)."""
    key, members = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            head, _, base = info.name.rpartition("/")
            stem, _, ext = base.partition(".")
            k = f"{head}/{stem}" if head else stem
            if k != key and members:
                yield key, members
                members = {}
            key = k
            members[ext.lower()] = tar.extractfile(info).read()
    if members:
        yield key, members


def caption_of(members: dict) -> tuple[str | None, dict]:
    meta = json.loads(members["json"]) if "json" in members else {}
    text = meta.get("caption") or meta.get("text")
    if not text and "txt" in members:
        text = members["txt"].decode("utf-8", errors="strict")
    return (str(text).strip() or None) if text else None, meta


def pick(templates: list[str], seed: int, *parts: str) -> str:
    h = hashlib.sha256("\x00".join([str(seed), *parts]).encode()).digest()
    return templates[int.from_bytes(h[:8], "big") % len(templates)]


def convert_shard(src: Path, dst: Path, templates: list[str], seed: int) -> Counter:
    stats: Counter = Counter()
    with ShardTarWriter(dst) as writer:
        for key, members in read_samples(src):
            try:
                text, meta = caption_of(members)
            except (ValueError, UnicodeDecodeError):
                stats["bad_caption"] += 1
                continue
            if text is None or not isinstance(meta, dict):
                stats["no_caption"] += 1
                continue
            question = pick(templates, seed, src.name, key)
            meta = {**meta, "caption": text, "task": "sft", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": text}]}
            out = {k: v for k, v in members.items() if k not in ("json", "txt")}
            out["json"] = json_bytes(meta)
            writer.write(key, out)
            stats["ok"] += 1
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="data_tools instruct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="inp", required=True, help="a folder of .tar shards or one .tar")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--templates", help="a text file, one question per line (default: built-in OCR questions)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        src = Path(args.inp)
        shards = sorted(src.glob("*.tar")) if src.is_dir() else [src]
        if not shards or not all(s.is_file() for s in shards):
            raise UsageError(f"--in {src}: no .tar shards found")
        templates = list(DEFAULT_TEMPLATES)
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
        for shard in shards:
            try:
                total += convert_shard(shard, out / shard.name, templates, args.seed)
            except tarfile.TarError as e:
                raise UsageError(f"{shard}: unreadable tar ({e})") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"shards": len(shards), **dict(sorted(total.items()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

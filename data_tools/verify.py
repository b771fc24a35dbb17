"""``data_tools verify DIR``: re-read every shard and check what the loader relies on.

Checks per shard: the tar reads to the end; members of a sample are adjacent (a key never comes back after another
key started); keys are unique within and across shards; every sample has exactly one image that fully decodes
and a UTF-8, non-empty caption when it has one; the count matches ``sizes.json``. Returns a report dict whose
``problems`` list is empty when everything is fine.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from .tario import IMAGE_EXTS


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything up to the first '.' of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def check_sample(key: str, members: dict[str, bytes]) -> list[str]:
    problems = []
    images = [e for e in members if e in IMAGE_EXTS]
    if len(images) != 1:
        problems.append(f"{key}: expected one image member, found {sorted(members)}")
    for ext in images:
        try:
            with Image.open(io.BytesIO(members[ext])) as img:
                img.load()
        except Exception as e:  # noqa: BLE001
            problems.append(f"{key}.{ext}: does not decode ({type(e).__name__}: {e})")
    if "txt" in members:
        try:
            if not members["txt"].decode("utf-8").strip():
                problems.append(f"{key}.txt: empty caption")
        except UnicodeDecodeError:
            problems.append(f"{key}.txt: not UTF-8")
    if "json" in members:
        try:
            json.loads(members["json"])
        except ValueError:
            problems.append(f"{key}.json: not valid JSON")
    return problems


def verify_shard(path: Path, seen_keys: dict[str, str]) -> tuple[int, list[str]]:
    problems: list[str] = []
    count = 0
    finished: set[str] = set()
    cur_key, cur = None, {}

    def flush():
        nonlocal count
        if cur_key is None:
            return
        problems.extend(f"{path.name}: {p}" for p in check_sample(cur_key, cur))
        if cur_key in seen_keys:
            problems.append(f"{path.name}: key {cur_key} already used in {seen_keys[cur_key]}")
        seen_keys[cur_key] = path.name
        count += 1

    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if key != cur_key:
                    flush()
                    if key in finished:
                        problems.append(f"{path.name}: members of {key} are not adjacent")
                    finished.add(key)
                    cur_key, cur = key, {}
                if ext in cur:
                    problems.append(f"{path.name}: {key} has member .{ext} twice")
                cur[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{path.name}: unreadable tar ({type(e).__name__}: {e})")
    flush()
    return count, problems


def verify_dir(root: str | Path) -> dict:
    root = Path(root)
    shards = sorted(root.glob("*.tar"))
    report = {"dir": str(root), "shards": len(shards), "samples": 0, "problems": []}
    if not shards:
        report["problems"].append(f"no .tar shards in {root}")
        return report
    sizes_path = root / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else None
    if sizes is None:
        report["problems"].append("sizes.json missing")
    seen: dict[str, str] = {}
    for shard in shards:
        n, problems = verify_shard(shard, seen)
        report["samples"] += n
        report["problems"].extend(problems)
        if sizes is not None and sizes.get(shard.name) != n:
            report["problems"].append(f"{shard.name}: {n} samples, sizes.json says {sizes.get(shard.name)}")
    if sizes is not None:
        for name in sorted(set(sizes) - {s.name for s in shards}):
            report["problems"].append(f"sizes.json lists {name}, which does not exist")
    return report

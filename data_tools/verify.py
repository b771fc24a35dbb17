"""``data_tools verify DIR``: re-read every shard and check what the loader relies on.

Checks per shard: the tar reads to the end; members of a sample are adjacent (a key never comes back after another
key started); keys are unique within and across shards; every sample has exactly one image that fully decodes (a
text-only conversation has none) and a UTF-8, non-empty caption when it has one, and its json (if any) is a JSON
object (the rules of ``ett_ds.data.format``, which the loader applies); no member is over its size cap
(``format.MAX_TEXT_BYTES`` / ``MAX_IMAGE_BYTES``: reported, never read, as the loader skips it); the count matches
``sizes.json``. Only whitelisted members within their cap are read, so memory stays bounded whatever a shard holds.
Returns a report dict whose ``problems`` list is empty when everything is fine.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from ett_ds.data.decode import CountingReader, open_shard
from ett_ds.data.format import (
    CAPTION_EXT,
    JSON_EXT,
    WHITELIST,
    SampleError,
    clean_caption,
    image_exts,
    member_too_large,
    open_tar_stream,
    read_json,
    split_name,
    text_only,
)
from ett_ds.data.shards import list_shards

# what a reason of ett_ds.data.format means in verify's report
PROBLEMS = {"empty_caption": "empty caption", "non_utf8_caption": "not UTF-8", "bad_json": "not a JSON object"}


def _text_only(data: bytes) -> bool:
    """A json member of a text-only conversation (the one kind of sample without an image)."""
    try:
        return text_only(read_json(data))
    except SampleError:
        return False


def check_sample(key: str, members: dict[str, bytes | None]) -> list[str]:
    """A member given as None was not read (not whitelisted, or over its size cap: reported where it was seen)."""
    problems = []
    images = image_exts(members)
    if len(images) != 1 and not (not images and members.get(JSON_EXT) and _text_only(members[JSON_EXT])):
        problems.append(f"{key}: expected one image member, found {sorted(members)}")
    for ext in images:
        if members[ext] is None:
            continue
        try:
            with Image.open(io.BytesIO(members[ext])) as img:
                img.load()
        except Exception as e:  # noqa: BLE001
            problems.append(f"{key}.{ext}: does not decode ({type(e).__name__}: {e})")
    for ext, check in ((CAPTION_EXT, clean_caption), (JSON_EXT, read_json)):
        if members.get(ext) is not None:
            try:
                check(members[ext])
            except SampleError as e:
                problems.append(f"{key}.{ext}: {PROBLEMS[e.reason]}")
    return problems


def open_url(url: str):
    """webdataset's opener: local paths, ``pipe:CMD``, http(s) (curl) and the other schemes gopen knows."""
    return open_shard(url)


class _Name(str):
    """A shard URL with the ``.name`` verify's messages use."""

    @property
    def name(self) -> str:
        return self if self.startswith("pipe:") else self.rstrip("/").rpartition("/")[2]


def verify_shard(path: Path | str, seen_keys: dict[str, str]) -> tuple[int, list[str]]:
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

    if isinstance(path, str) and not isinstance(path, _Name):
        path = _Name(path)
    try:
        stream = CountingReader(open_url(str(path)))
        with stream, open_tar_stream(stream) as tar:
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
                too_large = member_too_large(ext, info.size) if ext in WHITELIST else None
                if too_large:  # never read: the loader drops this sample unread too
                    problems.append(f"{path.name}: {key}.{ext}: {info.size} bytes, over the size cap "
                                    f"(the loader skips the sample as {too_large})")
                # only whitelisted members within their cap are read; the rest only count as present
                cur[ext] = None if ext not in WHITELIST or too_large else tar.extractfile(info).read()
            # tarfile takes a header cut in half for the end of the archive; a complete tar has two zero blocks
            # after its last member, so a stream that ends before them was truncated
            if stream.drain() < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("missing end-of-archive blocks (truncated)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        problems.append(f"{path.name}: unreadable tar ({type(e).__name__}: {e})")
        cur_key = None  # the sample being read when the data ran out is incomplete
    flush()
    return count, problems


def verify_urls(spec: str) -> dict:
    """Shards given as URLs (``a::b`` joins, brace patterns): ``pipe:CMD``, ``http(s)://host/dir/x.tar``, or a
    URL folder ending in ``/`` (its shards are those its ``sizes.json`` lists). Counts are checked against the
    ``sizes.json`` beside URL shards when there is one (not for ``pipe:``, which has no folder)."""
    from braceexpand import braceexpand
    report = {"dir": spec, "shards": 0, "samples": 0, "problems": []}
    shards: list[str] = []
    sizes_cache: dict[str, dict | None] = {}

    def sizes_at(folder: str) -> dict | None:
        if folder not in sizes_cache:
            try:
                with open_url(folder + "sizes.json") as f:
                    sizes_cache[folder] = json.loads(f.read())
            except (OSError, ValueError):
                sizes_cache[folder] = None
        return sizes_cache[folder]

    for part in spec.split("::"):
        for url in braceexpand(part.strip()):
            if url.endswith("/") and not url.startswith("pipe:"):
                listed = sizes_at(url)
                if listed is None:
                    report["problems"].append(f"{url}: no sizes.json to list the shards of a URL folder")
                    continue
                shards.extend(url + name for name in sorted(listed))
            else:
                shards.append(url)
    seen: dict[str, str] = {}
    for url in shards:
        n, problems = verify_shard(_Name(url), seen)
        report["shards"] += 1
        report["samples"] += n
        report["problems"].extend(problems)
        if not url.startswith("pipe:"):
            folder, _, name = url.rpartition("/")
            listed = sizes_at(folder + "/")
            if listed is not None and listed.get(name) != n:
                report["problems"].append(f"{name}: {n} samples, sizes.json says {listed.get(name)}")
    if not shards and not report["problems"]:
        report["problems"].append(f"no shards in {spec}")
    return report


def img2dataset_sizes(shards: list[Path]) -> dict | None:
    """img2dataset output has no sizes.json; each ``00000.tar`` has a ``00000_stats.json`` whose ``successes`` is
    the number of samples written to it (failed rows are only in the parquet). None unless every shard has one."""
    sizes = {}
    for shard in shards:
        stats = shard.with_name(shard.stem + "_stats.json")
        try:
            sizes[shard.name] = int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return sizes


def verify_dir(root: str | Path) -> dict:
    root = Path(root)
    shards = [Path(s) for s in list_shards(root)]  # absolute: a file's name never runs a command
    report = {"dir": str(root), "shards": len(shards), "samples": 0, "problems": []}
    if not shards:
        report["problems"].append(f"no .tar shards in {root}")
        return report
    sizes_path = root / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else img2dataset_sizes(shards)
    if sizes is None:
        report["problems"].append("sizes.json missing")
    elif not sizes_path.exists():
        report["counts_from"] = "img2dataset _stats.json"
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

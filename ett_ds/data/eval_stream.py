"""The evaluation stream over WebDataset shards: one finite pass, the same number of batches on every rank.

Evaluation (:func:`eval_batches`) is one finite pass: sorted shards split by rank, then by worker
(``shards[rank::world][worker::workers]``), so every sample is read exactly once across ranks x workers. Because
ZeRO-3 runs collectives inside every forward, each rank must run the *same number* of eval batches. That number is
computed before the first batch from the per-shard counts -- ``sizes.json`` next to the shards, or a header-only
scan of every shard when a count is missing -- as the maximum over all ranks of
``sum_workers ceil(n_worker / batch_size)``; every rank computes it from the same global shard list, so no
communication is needed. As a guard against ranks seeing different files, it is also all-reduced (MAX) when
``torch.distributed`` is initialised. Short ranks (fewer shards, or samples lost to decode errors) are topped up
with copies of a real batch whose ``batch["valid"]`` is all False; a rank never yields more than the target.
"""
from __future__ import annotations

import functools
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset

from .decode import count_samples, is_url, iter_tar_samples, open_shard
from .loader import current_worker, examples, finish_batch, iterate, make_loader, rank_world, seed_worker, stream_seed
from .shards import expand_urls

__all__ = ["eval_batches", "eval_plan", "shard_counts"]



@functools.lru_cache(maxsize=64)
def _sizes_json(directory: str) -> dict:
    """``sizes.json`` in a folder or beside remote shards (``http://host/dir/`` + ``sizes.json``); {} if none."""
    try:
        if is_url(directory):
            with open_shard(directory + "sizes.json") as f:
                data = json.loads(f.read())
        else:
            data = json.loads((Path(directory) / "sizes.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _beside(shard: str) -> tuple[str | None, str]:
    """(the folder sizes.json would be in, the shard's name there); no folder for a ``pipe:`` command."""
    if shard.startswith("pipe:"):
        return None, shard
    if is_url(shard):
        head, _, name = shard.rpartition("/")
        return head + "/", name
    return str(Path(shard).parent), Path(shard).name


def _img2dataset_successes(shard: str) -> int | None:
    """img2dataset writes ``00000_stats.json`` beside ``00000.tar``; its ``successes`` is the shard's sample count."""
    try:
        n = json.loads(Path(shard).with_name(Path(shard).stem + "_stats.json").read_text())["successes"]
        return int(n)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_counts(shards: list[str]) -> list[int]:
    """Samples per shard: ``sizes.json`` beside the shards when it lists the shard (local folder or the same URL
    folder), else img2dataset's ``NNNNN_stats.json`` (``successes``), else a header-only scan (a ``pipe:`` shard is always scanned: it has no folder)."""
    counts = []
    for s in shards:
        folder, name = _beside(s)
        n = _sizes_json(folder).get(name) if folder is not None else None
        if n is None and folder is not None and not is_url(s):
            n = _img2dataset_successes(s)
        counts.append(int(n) if n is not None else count_samples(s))
    return counts


def eval_plan(shards: list[str], batch_size: int, world_size: int, num_workers: int) -> list[int]:
    """Batches each rank yields before padding (shards split by rank, then by worker; one partial batch each)."""
    counts = dict(zip(shards, shard_counts(shards)))
    per_rank = []
    for r in range(world_size):
        mine = shards[r::world_size]
        per_rank.append(sum(math.ceil(sum(counts[s] for s in mine[w::max(1, num_workers)]) / batch_size)
                            for w in range(max(1, num_workers))))
    return per_rank


class _EvalStream(IterableDataset):
    def __init__(self, shards, batch_size, make_example, collate, max_pixels, pad_partial):
        super().__init__()
        self.shards, self.batch_size, self.make_example, self.collate = shards, batch_size, make_example, collate
        self.max_pixels, self.pad_partial = max_pixels, pad_partial

    def __iter__(self):
        worker, workers = current_worker()
        stats = Counter()
        rng = random.Random(stream_seed(0, 0, 0, worker))
        mine = self.shards[worker::workers]
        raw = (s for url in mine for s in iter_tar_samples(url, stats))
        batch: list = []
        held = None  # the last full batch, yielded once more samples (or the end) are seen, so that samples
        # skipped after it are still counted in some batch's data_stats
        for example in examples(raw, self.make_example, stats, rng, self.max_pixels, None):
            batch.append(example)
            if len(batch) == self.batch_size:
                if held is not None:
                    yield finish_batch(held, self.batch_size, self.batch_size, stats)
                held, batch = self.collate(batch), []
        if held is not None:
            yield finish_batch(held, self.batch_size, self.batch_size, stats)
        if batch:
            n = len(batch)
            if self.pad_partial:
                batch = batch + [batch[i % n] for i in range(self.batch_size - n)]
            yield finish_batch(self.collate(batch), n, len(batch), stats)


def _padding_batch(template: dict) -> dict:
    pad = dict(template)
    pad["valid"] = torch.zeros_like(template["valid"])
    pad["data_stats"] = {}
    return pad


def _all_reduce_max(value: int) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def eval_batches(urls, *, batch_size: int, make_example, collate, rank=None, world_size=None,
                 num_workers: int = 0, max_batches: int | None = None, pad_partial: bool = False,
                 max_pixels: int = 128_000_000, multiprocessing_context=None) -> Iterator[dict]:
    """One finite pass; every rank yields exactly the same number of batches (see the module docstring).

    Every batch carries ``batch["valid"]`` (bool per row; False rows are padding copies to be masked out of
    metrics) and ``batch["data_stats"]``. ``pad_partial`` also pads the last partial batch of each worker to
    ``batch_size`` rows (static shapes). ``max_batches`` caps the pass on every rank alike.
    """
    shards = sorted(expand_urls(urls))
    rank, world = rank_world(rank, world_size)
    target = max(eval_plan(shards, batch_size, world, num_workers))
    target = _all_reduce_max(target)
    if max_batches is not None:
        target = min(target, max_batches)
    mine = shards[rank::world]
    dataset = _EvalStream(mine, batch_size, make_example, collate, max_pixels, pad_partial)
    init = functools.partial(seed_worker, 0, 0, rank, max_pixels)
    n, last = 0, None
    if mine and target > 0:
        loader = make_loader(dataset, num_workers if len(mine) > 0 else 0, init, multiprocessing_context)
        for batch in iterate(loader):
            if n >= target:
                break
            yield batch
            last, n = batch, n + 1
        del loader
    if n < target and last is None:
        last = _template_batch(shards, make_example, collate, max_pixels)
    while n < target:
        yield _padding_batch(last)
        n += 1


def _template_batch(shards, make_example, collate, max_pixels) -> dict:
    """A rank without data still needs a batch of the right structure to pad with: build one from any shard."""
    stats: Counter = Counter()
    raw = (s for url in shards for s in iter_tar_samples(url, stats))
    for example in examples(raw, make_example, stats, random.Random(0), max_pixels, None):
        return finish_batch(collate([example]), 0, 1, Counter())
    raise RuntimeError(f"eval_batches: no decodable sample in {len(shards)} shard(s) to build padding batches")

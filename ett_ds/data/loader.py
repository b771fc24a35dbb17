"""What the training stream (``shards.py``) and the evaluation pass (``eval_stream.py``) share.

The rank and DataLoader worker a stream runs as (:func:`rank_world`, :func:`current_worker`), each worker's seeds
(:func:`stream_seed`, :func:`seed_worker`), decoding raw samples into examples with every skip counted by its reason
(:func:`examples`), a batch's ``valid`` mask and ``data_stats`` (:func:`finish_batch`), and the DataLoader whose
workers start with the preemption signals deferred and are shut down when the iteration ends (:func:`make_loader`,
:func:`iterate`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from ..engine import preempt
from .decode import decode_sample
from .format import SampleError

__all__ = ["stream_seed", "seed_worker", "rank_world", "current_worker", "examples", "finish_batch", "make_loader",
           "iterate"]


# ----------------------------------------------------------------------------------------------------------------
# Ranks, workers, seeds


def stream_seed(seed: int, segment: int, rank: int, worker: int) -> int:
    """A 63-bit seed per stream; hashing (not adding) keeps neighbouring tuples uncorrelated."""
    digest = hashlib.sha256(f"ett_ds/data:{seed}:{segment}:{rank}:{worker}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_worker(seed: int, segment: int, rank: int, max_pixels: int, worker_id: int) -> None:
    s = stream_seed(seed, segment, rank, worker_id)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)
    torch.set_num_threads(1)
    Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)


def rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def current_worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Samples -> examples -> batches


def examples(raw_samples: Iterator[dict], make_example: Callable, stats: Counter, rng: random.Random,
              max_pixels: int, decode_size, on_count: Callable[[], None] = lambda: None) -> Iterator:
    for raw in raw_samples:
        try:
            sample = decode_sample(raw, max_pixels=max_pixels, decode_size=decode_size)
        except SampleError as e:
            stats[e.reason] += 1
            on_count()
            continue
        sample["__rng__"] = rng
        try:
            example = make_example(sample)
        except SampleError as e:  # the Batcher's own reasons (missing_caption, bad_conversations, ...)
            stats[e.reason] += 1
            on_count()
            continue
        except Exception as e:  # noqa: BLE001 - any other failure is one bad sample, counted by its type
            stats[f"example_error:{type(e).__name__}"] += 1
            on_count()
            continue
        if example is None:
            stats["rejected"] += 1
            on_count()
            continue
        stats["ok"] += 1
        if isinstance(example, dict) and example.get("text_only"):
            stats["text_only"] += 1  # of the ok ones: sft samples without an image (not an error)
        yield example


def finish_batch(batch: dict, n_valid: int, n_total: int, stats: Counter) -> dict:
    valid = torch.zeros(n_total, dtype=torch.bool)
    valid[:n_valid] = True
    batch["valid"] = valid
    batch["data_stats"] = dict(stats)
    stats.clear()
    return batch


# ----------------------------------------------------------------------------------------------------------------
# The DataLoader


def make_loader(dataset, num_workers: int, worker_init, multiprocessing_context=None) -> DataLoader:
    kwargs = {}
    if num_workers > 0:
        main_pid = os.getpid() if preempt.active() else None  # a training process that checkpoints on a signal
        kwargs = dict(persistent_workers=True, worker_init_fn=functools.partial(_init_worker, worker_init, main_pid),
                      prefetch_factor=4, multiprocessing_context=multiprocessing_context)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      **kwargs)


def _init_worker(worker_init, main_pid: int | None, worker_id: int) -> None:
    if main_pid is not None:
        preempt.worker_init(main_pid)  # SIGTERM / SIGUSR1 are the training process's to act on, not a worker's
    worker_init(worker_id)


def iterate(loader: DataLoader) -> Iterator:
    """The loader's batches. Its workers start with the preemption signals deferred (engine/preempt.py) and are shut
    down (joined, terminated if need be) when the iteration ends: exhausted, closed, or failed."""
    if loader.num_workers == 0:
        yield from loader
        return
    with preempt.deferred():
        it = iter(loader)  # forks the workers
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

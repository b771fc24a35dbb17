"""Training and evaluation streams over WebDataset shards (open_clip's design, explicit about ranks and workers).

Training (:func:`train_batches`) is infinite: every (seed, segment, rank, worker) stream draws shards *with
replacement* from its own RNG, so no rank ever runs out first and hangs a collective, the trainer owns the step
count, and a resume reseeds by bumping ``segment`` instead of replaying consumed data. Samples are shuffled as raw
bytes (10-50x smaller than decoded pixels) and decoded last. With ``num_workers`` > 0 the DataLoader takes batches
from the workers in a fixed round robin, so the same arguments give the same batch sequence.
The finite evaluation pass is ``eval_stream.py``; what both share (ranks, workers, seeds, examples, the DataLoader)
is ``loader.py``.
"""
from __future__ import annotations

import functools
import glob
import os
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from braceexpand import braceexpand
from torch.utils.data import IterableDataset

from .decode import DataErrorRateExceeded, check_error_rate, is_url, iter_tar_samples
from .format import IMAGE_EXTS
from .loader import current_worker, examples, finish_batch, iterate, make_loader, rank_world, seed_worker, stream_seed

__all__ = ["train_batches", "expand_urls", "list_shards", "local_shard", "DataErrorRateExceeded"]


# ----------------------------------------------------------------------------------------------------------------
# URLs


def local_shard(path) -> str:
    """A local file as a shard URL: its absolute path. Only a string the user typed may be ``pipe:CMD`` or a URL;
    a name that comes from listing a folder or expanding a glob is a file, always, and webdataset's opener takes a
    relative name such as ``pipe:touch X;cat y #.tar`` or ``http:x.tar`` for a scheme (it runs the command, or
    curl). An absolute path starts with ``/``, which no scheme does, so the opener opens it as a file."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def list_shards(folder) -> list[str]:
    """The ``*.tar`` files of a folder, sorted, as :func:`local_shard` paths: what every reader that lists a shard
    folder (training, evaluation, ``data_tools verify``, ``data_tools instruct``) reads."""
    return sorted(local_shard(t) for t in Path(os.path.expanduser(os.fspath(folder))).glob("*.tar"))


def _expand_one(spec: str, missing: list[str]) -> list[str]:
    out: list[str] = []
    for path in braceexpand(spec):
        if is_url(path):  # pipe: and remote shards are taken as given; a missing one is counted when read
            out.append(path)
            continue
        p = Path(os.path.expanduser(path))
        if p.is_dir():
            tars = list_shards(p)
            if not tars:
                images = [f for f in p.iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTS][:1]
                missing.append(f"{p}/*.tar" + (" (a folder of images: make shards with `python -m data_tools shard "
                                                f"{p} --out SHARDS`)" if images else ""))
            out.extend(tars)
        elif glob.has_magic(str(p)):
            hits = sorted(local_shard(h) for h in glob.glob(str(p)))
            if not hits:
                missing.append(str(p))
            out.extend(hits)
        elif p.is_file():
            out.append(local_shard(p))
        else:
            missing.append(str(p))
    return out


def expand_urls(urls) -> list[str]:
    """Brace patterns, ``a::b`` joins, lists, directories (every ``*.tar`` inside), globs, ``pipe:CMD`` and
    ``http(s)://`` (any scheme webdataset's ``gopen`` opens) -> shard URLs. Local files (listed, globbed or named)
    become absolute paths (:func:`local_shard`): a file's name never runs a command or opens a URL.

    Raises a one-line FileNotFoundError naming what is missing (and how many paths are).
    """
    if isinstance(urls, (str, os.PathLike)):
        specs = str(urls).split("::")
    else:
        specs = [s for u in urls for s in str(u).split("::")]
    missing: list[str] = []
    out = [path for spec in specs if spec.strip() for path in _expand_one(spec.strip(), missing)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard(s) not found: {missing[0]}{more}")
    if not out:
        raise FileNotFoundError(f"no shards given: {urls!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training


def _shuffle(samples: Iterator[dict], size: int, rng: random.Random, initial: int) -> Iterator[dict]:
    """Buffer shuffle; starts yielding after ``initial`` samples and grows to ``size`` (webdataset's scheme)."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < size:
            nxt = next(samples, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) < initial:
            continue
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf




STALL_LIMIT = 10_000  # skips in a row (whatever the thresholds) after which a training stream gives up


class _TrainStream(IterableDataset):
    def __init__(self, urls, batch_size, make_example, collate, seed, segment, rank, shuffle_buffer, max_pixels,
                 max_error_rate, min_samples, decode_size, shuffle_initial):
        super().__init__()
        self.urls, self.batch_size, self.make_example, self.collate = urls, batch_size, make_example, collate
        self.seed, self.segment, self.rank = seed, segment, rank
        self.shuffle_buffer, self.shuffle_initial, self.max_pixels = shuffle_buffer, shuffle_initial, max_pixels
        self.max_error_rate, self.min_samples, self.decode_size = max_error_rate, min_samples, decode_size

    def _raw(self, rng: random.Random, stats: Counter, check: Callable[[], None]) -> Iterator[dict]:
        while True:  # resampled: shards drawn with replacement, forever
            yield from iter_tar_samples(self.urls[rng.randrange(len(self.urls))], stats)
            check()  # shard-level failures (missing, truncated) count too; all-broken shards must not spin

    def __iter__(self):
        worker, _ = current_worker()
        rng = random.Random(stream_seed(self.seed, self.segment, self.rank, worker))
        stats, totals = Counter(), Counter()
        where = f"rank {self.rank} worker {worker}"

        stall = [0, -1]  # consecutive checks without a new ok sample, ok count at the last check

        def check():  # also runs on skips, so a stream of nothing but bad samples fails instead of spinning
            now = totals + stats
            check_error_rate(now, self.max_error_rate, self.min_samples, where)
            stall[0] = stall[0] + 1 if now["ok"] == stall[1] else 0
            stall[1] = now["ok"]
            if stall[0] >= STALL_LIMIT:
                raise DataErrorRateExceeded(f"no usable sample in {STALL_LIMIT} attempts in {where}: "
                                            f"{dict(sorted(now.items()))}")

        raw = _shuffle(self._raw(rng, stats, check), self.shuffle_buffer, rng, self.shuffle_initial)
        batch = []
        for example in examples(raw, self.make_example, stats, rng, self.max_pixels, self.decode_size, check):
            batch.append(example)
            if len(batch) == self.batch_size:
                totals.update(stats)
                check_error_rate(totals, self.max_error_rate, self.min_samples, where)
                yield finish_batch(self.collate(batch), len(batch), len(batch), stats)
                batch = []


def train_batches(urls, *, batch_size: int, make_example, collate, seed: int = 0, segment: int = 0,
                  rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                  shuffle_buffer: int = 1000, max_pixels: int = 128_000_000, max_error_rate: float = 0.1,
                  min_samples_for_error_rate: int = 100, decode_size: tuple[int, int] | None = None,
                  shuffle_initial: int | None = None, multiprocessing_context=None) -> Iterator[dict]:
    """Infinite batches ``collate(examples) | {"valid", "data_stats"}`` for rank ``rank`` of ``world_size``.

    ``make_example(sample)`` gets ``{"__key__", "image" (RGB PIL), "text", "json", "__rng__"}`` where
    ``__rng__`` is the stream's ``random.Random`` (use it for augmentation: reproducible whatever the worker
    count); it returns an example or None (counted as ``rejected``). ``batch["data_stats"]`` holds the counts
    (``ok`` and skip reasons) of the worker that built the batch since its previous batch. Raises
    :class:`DataErrorRateExceeded` once errors / (ok + errors) > ``max_error_rate`` after
    ``min_samples_for_error_rate`` samples (checked per worker and over all batches seen here).
    ``decode_size`` (H, W): optional JPEG reduced-scale decode that still covers that size.
    """
    shards = expand_urls(urls)
    rank, _ = rank_world(rank, world_size)
    initial = shuffle_initial if shuffle_initial is not None else min(shuffle_buffer, 100)
    dataset = _TrainStream(shards, batch_size, make_example, collate, seed, segment, rank, shuffle_buffer,
                           max_pixels, max_error_rate, min_samples_for_error_rate, decode_size, initial)
    init = functools.partial(seed_worker, seed, segment, rank, max_pixels)
    totals: Counter = Counter()
    for batch in iterate(make_loader(dataset, num_workers, init, multiprocessing_context)):
        totals.update(batch["data_stats"])
        check_error_rate(totals, max_error_rate, min_samples_for_error_rate, f"rank {rank}")
        yield batch

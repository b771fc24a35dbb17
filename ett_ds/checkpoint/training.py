"""Training checkpoints: one step folder holding everything needed to continue exactly (see :mod:`.layout`).

:func:`save` (collective; the write path is :meth:`.manager.CheckpointManager.save`) writes DeepSpeed's sharded
engine state (all ranks call save), ``extra_rank{r}.pt`` (discriminator, EMA shard, RNG states, per rank), then
``trainer_state.json`` and ``config.yaml`` (rank 0) into a temporary folder, the ``complete`` marker last once
every file is on disk, renames it into place and prunes to the newest ``keep_last``. :func:`.manager.load`
(collective) reads it back through :func:`.safe.safe_load`; a folder written by another number of ranks is loaded
through DeepSpeed's universal checkpoint (:mod:`.reshard`). This module builds on the generic manager, never the
other way round.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .manager import Adapter, CheckpointManager


def rng_state() -> dict:
    """RNG states as tensors and plain data only (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_root: Path, step: int, trainer_state: dict, extra: dict, config_yaml: str,
         keep_last: int) -> Path:
    """Collective: every rank must call it. ``extra``: this rank's parts for ``extra_rank{r}.pt`` (RNG states are
    added). The Trainer saves through its :class:`.manager.CheckpointManager`; this is the same write path for
    callers that hold plain dicts."""
    m = CheckpointManager(engine, ckpt_root, keep_last)
    for key, value in extra.items():
        m.register(key, Adapter(lambda v=value: v, lambda _: None))
    m.register("rng", Adapter(rng_state, set_rng_state))
    m.register("trainer_state", Adapter(lambda: dict(trainer_state), lambda _: None), per_rank=False)
    return m.save(step, config_yaml)

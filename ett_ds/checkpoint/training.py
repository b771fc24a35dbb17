"""Training checkpoints: one step folder holding everything needed to continue exactly (see :mod:`.layout`).

:func:`save` (collective; the write path is :meth:`.manager.CheckpointManager.save`) writes DeepSpeed's sharded
engine state (all ranks call save), ``extra_rank{r}.pt`` (discriminator, EMA shard, RNG states, per rank), then
``trainer_state.json`` and ``config.yaml`` (rank 0) into a temporary folder, the ``complete`` marker last once
every file is on disk, renames it into place and prunes to the newest ``keep_last``. :func:`load` (collective)
reads it back through :func:`.safe.safe_load`; a folder written by another number of ranks is loaded through
DeepSpeed's universal checkpoint (:mod:`.reshard`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..engine import dist
from .layout import MARKER, TRAINER_STATE, ResumeError, extra_file, is_complete
from .safe import make_loads_safe, safe_load


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
    from .manager import Adapter, CheckpointManager
    m = CheckpointManager(engine, ckpt_root, keep_last)
    for key, value in extra.items():
        m.register(key, Adapter(lambda v=value: v, lambda _: None))
    m.register("rng", Adapter(rng_state, set_rng_state))
    m.register("trainer_state", Adapter(lambda: dict(trainer_state), lambda _: None), per_rank=False)
    return m.save(step, config_yaml)


def read_trainer_state(folder: Path) -> dict:
    f = folder / TRAINER_STATE
    if not is_complete(folder) or not f.is_file():
        raise ResumeError(f"{folder} is not a complete ett_ds checkpoint (no '{MARKER}' marker)")
    return json.loads(f.read_text())


def check_world_size(folder: Path, state: dict) -> bool:
    """Whether ``folder`` was written by another number of data-parallel ranks than this job has (it is then
    re-split on load). Raises ResumeError when the folder does not hold the shards its trainer_state names."""
    from .reshard import shard_count
    old = int(state.get("world_size", dist.world_size()))
    found = shard_count(folder)
    if found and found != old:
        raise ResumeError(f"{folder}: {TRAINER_STATE} names {old} data-parallel ranks but the folder holds ZeRO "
                          f"shards of {found}")
    return old != dist.world_size()


def load(engine, folder: Path, load_optimizer: bool = True) -> tuple[dict, dict]:
    """Collective. Restores the engine (and optimizer/scheduler); returns (trainer_state, this rank's extra)."""
    state = read_trainer_state(folder)
    other_world = check_world_size(folder, state)
    make_loads_safe(engine)
    if other_world:
        from . import reshard
        path = reshard.load_universal(engine, folder, state, load_optimizer)
    else:
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {folder}")
    if other_world:
        extra = reshard.merged_extras(folder, int(state["world_size"]))
    else:
        extra = safe_load(extra_file(folder, dist.rank()))
    return state, extra

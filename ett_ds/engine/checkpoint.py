"""Checkpoints: one folder per step holding everything needed to continue exactly.

``RUN/checkpoints/step_00000100/`` = DeepSpeed's sharded engine state (all ranks call save) + ``extra_rank{r}.pt``
(discriminator, EMA shard, RNG states, per rank) + ``trainer_state.json`` and ``config.yaml`` (rank 0) + a
``complete`` marker written last. Only folders with the marker count; the newest ``keep_last`` are kept.
A folder written by another number of ranks is loaded through DeepSpeed's universal checkpoint (:mod:`.reshard`).

Nothing read from a checkpoint can run code: every ``.pt`` file (ours and DeepSpeed's, on resume too) is read with
``torch.load(weights_only=True)`` through :func:`safe_load`, which allows tensors, plain containers and numbers plus
the few DeepSpeed/numpy types listed in :func:`allowed_globals`. A file that pickles anything else (e.g. an object
whose ``__reduce__`` calls ``os.system``) is refused with a one-line :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..models.ibq_checkpoint import CheckpointError
from . import dist

MARKER = "complete"
GOOD = "good"  # written into a checkpoint once a later step with finite loss and gradient norm ran from its weights


class ResumeError(RuntimeError):
    pass


def allowed_globals() -> list:
    """Types a weights_only load may rebuild besides tensors and plain data: what DeepSpeed's ZeRO optimizer state
    pickles (its stage enum and loss-scaler objects, rebuilt from their attribute dicts without running code) and
    numpy arrays (RNG states of checkpoints written before they were stored as tensors)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    out = [ZeroStageEnum, LossScaler, DynamicLossScaler, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
           type(np.dtype(np.float64))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return out + [_reconstruct]


def safe_load(path, map_location="cpu", **_ignored):
    """``torch.load(path, weights_only=True)`` with :func:`allowed_globals`; anything else is refused (one line,
    naming the file). Extra keyword arguments (DeepSpeed passes ``weights_only=False``) are ignored."""
    path = str(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"'{found.group(1)}'" if found else "a Python object"
        raise CheckpointError(f"{path}: refused to load: it pickles {what}, which is not a tensor or plain data "
                              "(loading it could run code)") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first})") from None


def make_loads_safe(engine) -> None:
    """Route every file DeepSpeed's ``engine.load_checkpoint`` reads (model and optimizer states) through
    :func:`safe_load` instead of its ``torch.load(weights_only=False)``."""
    engine.checkpoint_engine.load = safe_load


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if (p / MARKER).is_file())


def latest(ckpt_root: Path) -> Path | None:
    dirs = step_dirs(ckpt_root)
    return dirs[-1] if dirs else None


def newest_good(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint known to be good (marked by :func:`mark_good`)."""
    good = [d for d in step_dirs(ckpt_root) if (d / GOOD).is_file()]
    return good[-1] if good else None


def mark_good(folder: Path) -> None:
    """Rank 0 records that a step with a finite loss and gradient norm ran from ``folder``'s weights."""
    if dist.is_rank0() and (folder / MARKER).is_file():
        (folder / GOOD).write_text("ok\n")


def to_prune(dirs: list[Path], keep_last: int) -> list[Path]:
    """Which of the complete checkpoints ``dirs`` (oldest first) to delete: all but the newest ``keep_last`` and
    the newest one known to be good (a diverged run never deletes its last good weights)."""
    if keep_last <= 0:
        return []
    keep = set(dirs[-keep_last:])
    good = [d for d in dirs if (d / GOOD).is_file()]
    if good:
        keep.add(good[-1])
    return [d for d in dirs if d not in keep]


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
    """Collective: every rank must call it."""
    tag = f"step_{step:08d}"
    folder = ckpt_root / tag
    if dist.is_rank0():
        ckpt_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"ett_step": step})
    rank = dist.rank()
    torch.save({**extra, "rng": rng_state()}, folder / f"extra_rank{rank}.pt")
    dist.barrier()
    if dist.is_rank0():
        from .reshard import param_groups_state
        state = {**trainer_state, "step": step, "world_size": dist.world_size(),
                 "global_batch": engine.train_batch_size(), "micro_batch": engine.train_micro_batch_size_per_gpu(),
                 "accumulation": engine.gradient_accumulation_steps(), "param_groups": param_groups_state(engine)}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (folder / "config.yaml").write_text(config_yaml)
        (folder / MARKER).write_text("ok\n")
        for old in to_prune(step_dirs(ckpt_root), keep_last):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def read_trainer_state(folder: Path) -> dict:
    f = folder / "trainer_state.json"
    if not (folder / MARKER).is_file() or not f.is_file():
        raise ResumeError(f"{folder} is not a complete ett_ds checkpoint (no '{MARKER}' marker)")
    return json.loads(f.read_text())


def check_world_size(folder: Path, state: dict) -> bool:
    """Whether ``folder`` was written by another number of data-parallel ranks than this job has (it is then
    re-split on load). Raises ResumeError when the folder does not hold the shards its trainer_state names."""
    from .reshard import shard_count
    old = int(state.get("world_size", dist.world_size()))
    found = shard_count(folder)
    if found and found != old:
        raise ResumeError(f"{folder}: trainer_state.json names {old} data-parallel ranks but the folder holds ZeRO "
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
        extra = safe_load(folder / f"extra_rank{dist.rank()}.pt")
    return state, extra

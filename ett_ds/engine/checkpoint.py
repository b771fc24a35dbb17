"""Checkpoints: one folder per step holding everything needed to continue exactly.

``RUN/checkpoints/step_00000100/`` = DeepSpeed's sharded engine state (all ranks call save) + ``extra_rank{r}.pt``
(discriminator, EMA shard, RNG states, per rank) + ``trainer_state.json`` and ``config.yaml`` (rank 0) + a
``complete`` marker written last. Only folders with the marker count; the newest ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import dist

MARKER = "complete"


class ResumeError(RuntimeError):
    pass


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if (p / MARKER).is_file())


def latest(ckpt_root: Path) -> Path | None:
    dirs = step_dirs(ckpt_root)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        state = {**trainer_state, "step": step, "world_size": dist.world_size()}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (folder / "config.yaml").write_text(config_yaml)
        (folder / MARKER).write_text("ok\n")
        for old in step_dirs(ckpt_root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def read_trainer_state(folder: Path) -> dict:
    f = folder / "trainer_state.json"
    if not (folder / MARKER).is_file() or not f.is_file():
        raise ResumeError(f"{folder} is not a complete ett_ds checkpoint (no '{MARKER}' marker)")
    return json.loads(f.read_text())


def check_world_size(folder: Path, state: dict) -> None:
    ws = dist.world_size()
    if state.get("world_size", ws) != ws:
        raise ResumeError(
            f"{folder} was written by {state['world_size']} data-parallel ranks, this job has {ws}. ZeRO shards "
            "cannot be re-split directly: convert it with DeepSpeed's universal checkpoint tool "
            f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {folder} --output_folder "
            f"{folder}_universal) and load that with \"checkpoint\": {{\"load_universal\": true}}, or start a new "
            f"run with train.init_from={folder}")


def load(engine, folder: Path, load_optimizer: bool = True) -> tuple[dict, dict]:
    """Collective. Restores the engine (and optimizer/scheduler); returns (trainer_state, this rank's extra)."""
    state = read_trainer_state(folder)
    check_world_size(folder, state)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {folder}")
    extra = torch.load(folder / f"extra_rank{dist.rank()}.pt", map_location="cpu", weights_only=False)
    return state, extra

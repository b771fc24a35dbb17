"""Resuming on another number of data-parallel ranks: DeepSpeed's universal checkpoint, done by ett_ds itself.

A ZeRO checkpoint holds one shard per rank of the weights and optimizer states, and ett_ds adds per-rank extras (the
EMA of the local weight shards, RNG states; the discriminator is replicated). When a job resumes on another world
size (a requeued SLURM job that got another number of nodes):

* the global batch of the checkpoint is kept: gradient accumulation is recomputed for the new number of ranks
  (:func:`keep_global_batch`, before the engine is built) and the run says so in its log;
* rank 0 converts the step folder with DeepSpeed's ``ds_to_universal`` (every file it reads goes through
  :func:`.safe.safe_load`) into ``step_XXXXXXXX.universal`` beside it, and every rank loads that with
  DeepSpeed's universal loader (weights, fp32 masters, Adam moments re-split); the converted folder is deleted after
  the load (a later resume at yet another size converts again); the optimizer's per-group hyperparameters, which
  the universal loader takes from the first group only, are restored from ``trainer_state.json``;
* the EMA shards of all old ranks are joined per parameter and cut again for this rank (:func:`ema_state`), the
  discriminator comes from old rank 0, and RNG states from the old rank of the same number (rank 0's for new ranks).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
from pathlib import Path

import torch

from ..engine import dist
from ..engine.zero3 import deepspeed_module
from .layout import TRAINER_STATE, ResumeError, extra_file
from .safe import reads_safely, safe_load

UNIVERSAL_SUFFIX = ".universal"


class ReshardError(ResumeError):
    pass


def shard_count(folder: Path) -> int:
    """Data-parallel ranks whose ZeRO optimizer shards the step folder holds."""
    return len(list(folder.glob("*zero_pp_rank_*_mp_rank_*optim_states.pt")))


def old_global_batch(state: dict) -> int | None:
    if state.get("global_batch"):
        return int(state["global_batch"])
    if state.get("step"):  # checkpoints written before the global batch was recorded
        return int(state["samples_seen"]) // int(state["step"])
    return None


def keep_global_batch(cfg, folder: Path | None, world_size: int) -> str | None:
    """A resume keeps the global batch of its checkpoint: when the recipe sets no ``train.global_batch_size`` and
    the checkpoint's global batch differs from micro-batch x ranks (another world size now, or an earlier resume
    that kept it), set it, so gradient accumulation absorbs the difference. Returns the line to log (None when
    nothing changes). Raises ReshardError when the global batch cannot be reached."""
    if folder is None or not (folder / TRAINER_STATE).is_file():
        return None
    state = json.loads((folder / TRAINER_STATE).read_text())
    old_ws = int(state.get("world_size", world_size))
    old = old_global_batch(state)
    micro = cfg.train.micro_batch_size
    kept = cfg.train.global_batch_size is None and old is not None and old != micro * world_size
    if kept:
        cfg.train.global_batch_size = old
    if old_ws == world_size and not kept:
        return None
    gbs = cfg.train.global_batch_size or micro * world_size
    if gbs % (micro * world_size):
        raise ReshardError(
            f"{folder} was trained with a global batch of {gbs}, which {world_size} ranks x micro-batch {micro} "
            f"cannot reach by gradient accumulation: set train.micro_batch_size (or train.global_batch_size)")
    accum = gbs // (micro * world_size)
    if old_ws == world_size:
        return (f"resuming {folder.name}: its global batch {gbs} kept, gradient accumulation {accum} "
                f"(micro-batch {micro}, {world_size} ranks; set train.global_batch_size to change it)")
    return (f"resuming {folder.name} (written by {old_ws} data-parallel ranks) on {world_size}: global batch {gbs} "
            f"kept, gradient accumulation {state.get('accumulation', '?')} -> {accum} (micro-batch {micro}); "
            "weights and optimizer states re-split through DeepSpeed's universal checkpoint")


def convert(folder: Path) -> Path:
    """Rank 0: ``folder`` -> ``folder.universal`` with DeepSpeed's ds_to_universal (written under a temporary name,
    renamed when complete)."""
    ds_to_universal = deepspeed_module("checkpoint.ds_to_universal")
    out = folder.with_name(folder.name + UNIVERSAL_SUFFIX)
    tmp = folder.with_name(f".{folder.name}{UNIVERSAL_SUFFIX}.tmp")
    for old in (out, tmp):
        shutil.rmtree(old, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with reads_safely(ds_to_universal), contextlib.redirect_stdout(None):
        ds_to_universal.main(args)
    tmp.rename(out)
    return out


def load_universal(engine, folder: Path, state: dict, load_optimizer: bool = True):
    """Collective: convert (rank 0) and load ``folder`` written by another world size. Returns DeepSpeed's path."""
    error = None
    if dist.is_rank0():
        try:
            convert(folder)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    error = dist.broadcast_object(error)
    if error:
        raise ReshardError(f"converting {folder} to a universal checkpoint failed: {error}")
    uni = folder.with_name(folder.name + UNIVERSAL_SUFFIX)
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(uni.parent), tag=uni.name, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer)
    finally:
        config.load_universal_checkpoint = False
    groups = state.get("param_groups")
    if groups and len(groups) == len(engine.optimizer.param_groups):
        for group, saved in zip(engine.optimizer.param_groups, groups):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    dist.barrier()
    if dist.is_rank0():
        shutil.rmtree(uni, ignore_errors=True)
        (uni.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer file
    return path


def param_groups_state(engine) -> list[dict]:
    """The optimizer's per-group hyperparameters (lr, betas, names...), JSON-ready, for trainer_state.json."""
    out = []
    for group in engine.optimizer.param_groups:
        out.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
                    if k != "params" and isinstance(v, (int, float, str, bool, tuple, list, type(None)))})
    return out


def merged_extras(folder: Path, old_ws: int) -> dict:
    """This rank's extras for a checkpoint of ``old_ws`` ranks: discriminator from old rank 0, RNG states from the
    old rank of the same number (else rank 0), and every old rank's EMA shards under ``ema_shards``."""
    extras = [safe_load(extra_file(folder, r)) for r in range(old_ws)]
    rank = dist.rank()
    out = dict(extras[0])
    out["rng"] = extras[rank if rank < old_ws else 0]["rng"]
    if "ema" in extras[0]:
        out["ema_shards"] = [e["ema"] for e in extras]
        out.pop("ema")
    return out


def ema_state(extra: dict, params: dict) -> dict:
    """The EMA state for this rank's shards: ``extra["ema"]`` as saved, or (after a world-size change) each
    parameter's EMA joined from all old ranks' shards and cut as ZeRO-3 cuts the parameter here (rank r holds
    elements [r*p, (r+1)*p) of the flattened, zero-padded tensor, p = the local partition size)."""
    if "ema_shards" not in extra:
        return extra["ema"]
    olds = extra["ema_shards"]
    rank, ws = dist.rank(), dist.world_size()
    shadow = {}
    for name, p in params.items():
        pieces = [o["shadow"][name].reshape(-1) for o in olds]
        if not hasattr(p, "ds_tensor"):  # no ZeRO-3: every rank kept the full tensor
            shadow[name] = pieces[0].reshape(p.shape).clone()
            continue
        numel, part = p.ds_numel, p.ds_tensor.numel()
        full = torch.cat(pieces)
        if full.numel() < numel or part * ws < numel or part != math.ceil(numel / ws):
            raise ReshardError(f"EMA of {name}: shards of {full.numel()} elements cannot be cut into {ws} x {part}")
        padded = torch.zeros(part * ws, dtype=full.dtype)
        padded[:numel] = full[:numel]
        shadow[name] = padded[rank * part:(rank + 1) * part].reshape(p.ds_tensor.shape).clone()
    return {"decay": olds[0]["decay"], "shadow": shadow}

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
import yaml

from ..config import Config, to_dict
from . import reshard
from .layout import RUN_CONFIG, TOKENIZER_EMA, ResumeError, latest
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


# -- a Trainer's state ---------------------------------------------------------------------------------------------
def trainer_manager(tr) -> CheckpointManager:
    """Every part of a Trainer's state, registered once: its save and resume are one call each. Reads ``tr``'s
    engine, ``objective`` (discriminator), ``ema``, counters (``step``, ``segment``, ``samples_seen``) and
    ``write_tokenizer_ema``."""
    m = CheckpointManager(tr.engine, tr.ckpt_root, tr.cfg.train.keep_last, log=tr.log.info)
    if tr.objective is not None:  # the discriminator, its optimizer, LeCAM anchors
        m.register("gan", Adapter(tr.objective.extra_state, tr.objective.load_extra_state))
    if tr.ema is not None:  # this rank's EMA shards (joined from every old rank's after a world-size change)
        ema = tr.ema
        m.register("ema", Adapter(ema.state_dict, reads_all=True,
                                  load=lambda extra: ema.load_state_dict(reshard.ema_state(extra, ema.params))))
        m.register_file(TOKENIZER_EMA, tr.write_tokenizer_ema)
    m.register("rng", Adapter(rng_state, set_rng_state))
    m.register("counters", Adapter(lambda: counters(tr), lambda state: set_counters(tr, state)), per_rank=False)
    return m


def counters(tr) -> dict:
    return {"segment": tr.segment, "samples_seen": tr.samples_seen, "stage": tr.cfg.stage}


def set_counters(tr, state: dict) -> None:
    tr.step, tr.segment, tr.samples_seen = state["step"], state["segment"], state["samples_seen"]


def resume_folder(cfg: Config) -> Path | None:
    """The checkpoint ``train.resume`` names: the newest complete one for ``auto``, none for ``never``."""
    r = cfg.train.resume
    if r == "auto":
        return latest(cfg.run_dir / "checkpoints")
    if r in ("never", "", None):
        return None
    return Path(r)


# Optimizer hyperparameters a resume takes from the config, not from the checkpoint (DeepSpeed's optimizer load
# restores the saved param groups). The schedule (warm-up, shape, max_steps) is read from the config at every step.
GROUP_SETTINGS = ("ett_peak_lr", "betas", "weight_decay")
SCHEDULE_KEYS = ("train.max_steps",)


def optimizer_settings(engine) -> list[dict]:
    return [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in engine.optimizer.param_groups]


def restore_optimizer_settings(engine, settings: list[dict]) -> None:
    """Put the config's peak lr, betas and weight decay back on every param group after a checkpoint load and let
    the schedule recompute the lr of the resumed step from them."""
    groups = engine.optimizer.param_groups
    if len(groups) != len(settings):
        raise ResumeError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run "
                          f"{len(settings)}")
    for group, s in zip(groups, settings):
        group.update(s)
    sched = engine.lr_scheduler
    if sched is not None:
        sched.load_state_dict(sched.state_dict())  # re-applies peak x factor(step)


def changed_settings(folder: Path, cfg: Config) -> str:
    """'optim.lr 0.0006 -> 0.001, ...' for the optimizer and schedule keys that differ between ``folder``'s
    config.yaml and ``cfg`` ('' when none or the checkpoint has no config)."""
    f = folder / RUN_CONFIG
    if not f.is_file():
        return ""
    old = yaml.safe_load(f.read_text()) or {}
    new = to_dict(cfg)
    out = []
    keys = [f"optim.{k}" for k in sorted(set(new.get("optim", {})) | set(old.get("optim", {})))] + list(SCHEDULE_KEYS)
    for key in keys:
        section, name = key.split(".")
        a, b = (old.get(section) or {}).get(name), (new.get(section) or {}).get(name)
        if a != b:
            out.append(f"{key} {a} -> {b}")
    return ", ".join(out)

"""What a training run's checkpoints add to the generic manager (:mod:`.manager`): the RNG states as plain
tensors, which checkpoint ``train.resume`` names, the optimizer settings a resume takes from the config.

The Trainer registers its parts (engine, discriminator, EMA, RNG, counters) with a
:class:`.manager.CheckpointManager` once; the manager's save (collective) writes DeepSpeed's sharded engine state,
``extra_rank{r}.pt`` per rank, ``trainer_state.json`` and ``config.yaml`` into a temporary folder, the ``complete``
marker last, renames it into place and prunes to the newest ``keep_last``; its load reads it back through
:func:`.safe.safe_load`, through DeepSpeed's universal checkpoint (:mod:`.reshard`) when the number of ranks changed.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import Config, to_dict
from .layout import RUN_CONFIG, ResumeError, latest


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

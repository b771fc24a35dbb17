"""ZeRO-3 helpers: building modules with or without partitioning, and reaching full or local parameters.

Under ZeRO-3 each rank holds a shard of every parameter (``param.ds_tensor``); a full tensor exists only inside a
gather (:class:`gathered`), the rank's own part is :func:`local_shard`. ``engine/deepspeed.enable_zero_init``
registers transformers' ``HfDeepSpeedConfig`` so that LLMs are built inside ``deepspeed.zero.Init`` (partitioned at
creation); :func:`no_zero_init` builds unpartitioned modules in a process that registered one (loading a checkpoint
for inference after a training, in tests and experiments). Without ZeRO-3 every helper is a no-op or the identity.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch


def deepspeed_module(submodule: str = ""):
    """deepspeed, imported on first use (its import takes ~1.4 s; commands that never build an engine do not pay it).
    ``submodule`` (e.g. ``"checkpoint.ds_to_universal"``) gives that submodule of deepspeed instead, imported too."""
    import deepspeed  # reason: the one home of deepspeed's slow import (~1.4 s), paid only by code that uses it
    return importlib.import_module(f"deepspeed.{submodule}") if submodule else deepspeed


class gathered:
    """GatheredParameters when the params are ZeRO-3 partitioned, a no-op otherwise (``modify``: rank 0's changes
    are kept, broadcast to every rank when the context ends)."""

    def __init__(self, params, modify: bool = False):
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.modify = modify
        self.ctx = None

    def __enter__(self):
        if self.params:
            self.ctx = deepspeed_module().zero.GatheredParameters(self.params, modifier_rank=0 if self.modify else None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def register_child_reads(model: torch.nn.Module) -> int:
    """Under ZeRO-3, have DeepSpeed gather the child weights a module's forward reads directly (a quantizer reads its
    codebook ``embedding.weight`` without calling the embedding), whenever that module runs: inside the engine's
    forward and outside it (validation, image logging, the end-of-run EMA report). Such a module names them in a
    ``zero3_reads`` attribute. DeepSpeed registers a read it sees only while the weight is partitioned during an engine
    forward; after a resume it may not see one, and the weight then reads as an empty shard outside the engine.
    Returns how many weights were registered (0 without ZeRO-3)."""
    count = 0
    for module in model.modules():
        for name in getattr(module, "zero3_reads", ()):
            param = module.get_parameter(name)
            if hasattr(param, "ds_id"):
                deepspeed_module().zero.register_external_parameter(module, param)
                count += 1
    return count


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter (``ds_tensor``), the whole ``data`` of any other tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


@contextlib.contextmanager
def no_zero_init():
    """Build modules unpartitioned even when a ZeRO-3 trainer in this process registered HfDeepSpeedConfig."""
    dsi = sys.modules.get("transformers.integrations.deepspeed")
    saved = getattr(dsi, "_hf_deepspeed_config_weak_ref", None)
    if dsi is not None:
        dsi._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        if dsi is not None:
            dsi._hf_deepspeed_config_weak_ref = saved

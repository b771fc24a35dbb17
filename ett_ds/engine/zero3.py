"""ZeRO-3 helpers: building modules with or without partitioning, and reaching full or local parameters.

Under ZeRO-3 each rank holds a shard of every parameter (``param.ds_tensor``); a full tensor exists only inside a
gather. ``engine/deepspeed.enable_zero_init`` registers transformers' ``HfDeepSpeedConfig`` so that LLMs are built
inside ``deepspeed.zero.Init`` (partitioned at creation); :func:`no_zero_init` builds unpartitioned modules in a
process that registered one (loading a checkpoint for inference after a training, in tests and experiments).
"""
from __future__ import annotations

import contextlib
import sys


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

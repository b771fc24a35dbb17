"""EMA of the trainable tokenizer weights, kept on each rank's LOCAL fp32 shard (no communication per step).

Under ZeRO-3 each parameter's local partition is ``param.ds_tensor`` (fp32 in this project's precision modes); the
EMA is a copy of that partition, updated elementwise after every optimizer step. For evaluation and export the EMA
shards are swapped into the partitions (``swapped()``); gathering for export then sees the EMA weights. Without
ZeRO-3 (ZeRO-0/1/2) the full ``param.data`` plays the role of the shard.

The decay is warmed up as taming's ``LitEma`` does: after step n it is ``min(decay, (1 + n) / (10 + n))`` (0.18 after
step 1, 0.87 after step 60, 0.99 after step 890; ``decay=0.999`` is reached after about 9,000 steps), so the EMA of a
short run follows its raw weights instead of staying near the random init. n is the trainer's step (kept in every
checkpoint), so a resumed run, on any number of ranks, continues the same schedule.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .zero3 import local_shard


def warmed_up(decay: float, step: int) -> float:
    """The decay applied after optimizer step ``step`` (1 for the first)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class ShardEMA:
    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.last_decay = None  # the decay the latest update applied
        self.params = {n: p for n, p in named_params if p.requires_grad}
        self.shadow = {n: local_shard(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (the trainer's count, 1 for the first)."""
        self.last_decay = warmed_up(self.decay, step)
        for n, p in self.params.items():
            self.shadow[n].lerp_(local_shard(p).float(), 1.0 - self.last_decay)

    @contextmanager
    def swapped(self):
        """Temporarily put the EMA weights in the parameters' local shards."""
        backup = {}
        with torch.no_grad():
            for n, p in self.params.items():
                s = local_shard(p)
                backup[n] = s.detach().clone()
                s.copy_(self.shadow[n].to(s.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    local_shard(p).copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        for n, t in state["shadow"].items():
            if n not in self.shadow or self.shadow[n].shape != t.shape:
                raise RuntimeError(f"EMA state does not match the model at {n}")
            self.shadow[n].copy_(t)

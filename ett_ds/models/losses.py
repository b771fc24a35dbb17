"""Loss functions as pure functions (no module state), each unit-tested against hand-computed values."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.text import IGNORE
from ..tokenizers.chunked import LinearCrossEntropy, auto_chunk_tokens


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over positions whose target is not IGNORE (logits: (N, V), targets: (N,)).

    Computed in fp32, without a host synchronisation. An all-ignored batch gives 0 (connected to the graph).
    """
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return total / (targets != IGNORE).sum().clamp_min(1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """``caption_loss(F.linear(hidden, weight), targets)`` without ever holding the logits of all rows: the head's
    matmul and the softmax run ``chunk_tokens`` rows at a time, forward and (recomputed) backward
    (``chunked.LinearCrossEntropy``). Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would.
    ``chunk_tokens=None``: from the memory budget of ``chunked.auto_chunk_tokens``."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0], 3)
    total = LinearCrossEntropy.apply(hidden, weight, targets, chunk, IGNORE, dtype)
    return total / (targets != IGNORE).sum().clamp_min(1)


def head_caption_loss(head, hidden: torch.Tensor, targets: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """``caption_loss(head(hidden), targets)`` for a head module whose weight may only be touched inside its own call
    (ZeRO-3 gathers it there), e.g. a Hugging Face ``lm_head``: with ``chunks`` > 1 the rows are split into that many
    pieces, each ``head`` call + cross-entropy under non-reentrant activation checkpointing, so only one piece's logits
    exist at a time, in forward and in backward. A fixed ``chunks`` keeps the module-call order the same every step."""
    if chunks <= 1:
        return caption_loss(head(hidden), targets)

    def piece(h, t):
        return F.cross_entropy(head(h).float(), t, ignore_index=IGNORE, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks)):
        if torch.is_grad_enabled():
            total = total + checkpoint(piece, h, t, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + piece(h, t)
    return total / (targets != IGNORE).sum().clamp_min(1)


def total_loss(out: dict, batch: dict, objective, vq_weight: float, step: int,
               device: torch.device) -> tuple[torch.Tensor, dict]:
    """L = L_cap (+ L_t2i) + vq_weight * L_vq from a forward's ``out`` and its ``batch`` (``objective``, a
    ``tokenizers.objective.VQObjective`` or None, owns what is inside L_vq; ``vq_weight`` is loss.alpha, or 1 where
    L_vq is the whole loss); returns the total and the detached terms for logging."""
    terms = {}
    total = torch.zeros((), device=device)
    for key in ("loss_cap", "loss_t2i"):
        if key in out:
            total = total + out[key]
            terms[key] = out[key]
    if objective is not None:
        l_vq, vq_terms = objective(batch["pixels"], out["recon"], out["quantizer_terms"], step)
        terms.update(vq_terms)
        terms["loss_vq"] = l_vq
        total = total + vq_weight * l_vq
    terms["loss"] = total
    return total, {k: v.detach().float() for k, v in terms.items()}

"""K-wide computations over token chunks, so that no N x K tensor ever exists for all N tokens at once.

* :class:`IBQChunked`: the IBQ quantizer's K-wide part (logits z . E^T, argmax, the straight-through soft path and
  the MAGVIT-v2 entropy loss) as one autograd function. Forward keeps nothing N x K: per chunk it computes the logits,
  their argmax and the two sums the entropy loss needs (the sample entropy and the batch-mean distribution, K floats).
  Backward recomputes each chunk's logits and forms their gradient directly.
* :class:`LinearCrossEntropy`: ``cross_entropy(hidden @ W^T, targets, reduction="sum")`` for a K-wide output head,
  chunk by chunk in forward and again in backward (the weight gradient is accumulated into one buffer); the LLM
  side's heads use it through ``models/losses.linear_cross_entropy`` (the visual-code head is K wide too).

Both compute the same formulas as the unchunked code (``ibq.entropy_loss`` and the plain IBQ quantizer,
``models.losses.caption_loss`` of a full logits matrix); only the order of floating-point summation differs. How large
a chunk is follows from a memory budget: :func:`auto_chunk_tokens`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes that one chunk's K-wide temporaries may take (a few fp32 copies of chunk x K), unless configured.
CHUNK_BUDGET_BYTES = 256 * 2 ** 20
QUANT_COPIES = 4  # the quantizer's backward holds up to four chunk x K fp32 tensors at once
HEAD_COPIES = 2  # the head's forward/backward: the logits (bf16 or fp32) + one fp32 copy


def auto_chunk_tokens(width: int, copies: int = QUANT_COPIES, budget_bytes: int = CHUNK_BUDGET_BYTES,
                      multiple: int = 8) -> int:
    """Tokens per chunk such that ``copies`` fp32 tensors of chunk x ``width`` fit ``budget_bytes``."""
    n = budget_bytes // (4 * copies * max(int(width), 1))
    return max(multiple, n // multiple * multiple)


def _spans(n: int, chunk: int):
    chunk = max(int(chunk), 1)
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def chunked_argmax(zf: torch.Tensor, codebook: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax_k z . E_k for every row of ``zf``, ``chunk`` rows at a time (no gradient)."""
    idx = torch.empty(zf.shape[0], dtype=torch.long, device=zf.device)
    with torch.no_grad():
        for s, e in _spans(zf.shape[0], chunk):
            idx[s:e] = (zf[s:e] @ codebook.t()).argmax(-1)
    return idx


def _probs(scaled_logits: torch.Tensor) -> torch.Tensor:
    """softmax, the value of ``log_softmax(x).exp()`` to rounding. At T = 0.01 almost every log-probability is
    below -87, and exp of those (zero or denormal results) is ~8x slower on CPU than softmax's own exp(x - max)."""
    return torch.softmax(scaled_logits, -1)


class IBQChunked(torch.autograd.Function):
    """(zf (N, D), codebook (K, D)) -> (indices (N,), soft (N, D), entropy loss (scalar)).

    ``soft`` is ``(softmax(logits) - sg(softmax(logits))) @ sg(E)``: identically zero, its gradient g reaches the
    logits as softmax' (g @ E^T). The entropy loss is MAGVIT-v2's, ``ibq.entropy_loss(logits, temperature, eps)``:
    mean_i H(p_i) + sum_k a_k log(a_k + eps) with p = softmax(logits / T) and a = mean_i p_i, the batch
    distribution. Its gradient w.r.t. log p_ik is p_ik (c_k - 1 - log p_ik) / N with
    c_k = log(a_k + eps) + a_k / (a_k + eps), then through log_softmax and / T. All maths in fp32.
    """

    @staticmethod
    def forward(ctx, zf, codebook, temperature: float, chunk: int, eps: float = 1e-5):
        ctx.set_materialize_grads(False)  # an unused output (e.g. no entropy term) costs no backward work
        n = zf.shape[0]
        idx = torch.empty(n, dtype=torch.long, device=zf.device)
        avg = torch.zeros(codebook.shape[0], dtype=zf.dtype, device=zf.device)
        plogp = zf.new_zeros(())
        for s, e in _spans(n, chunk):
            logits = zf[s:e] @ codebook.t()
            idx[s:e] = logits.argmax(-1)
            logp = torch.log_softmax(logits.div_(temperature), -1)
            p = _probs(logits)
            del logits
            plogp += torch.linalg.vecdot(p, logp).sum()
            avg += p.sum(0)
            del p, logp
        avg /= n
        shifted = avg + eps
        ent = -plogp / n + (avg * shifted.log()).sum()
        # d ent / d avg: log(a + eps) + a / (a + eps)
        ctx.save_for_backward(zf, codebook, torch.log(shifted).add_(avg / shifted))
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(idx)
        return idx, zf.new_zeros(n, codebook.shape[1]), ent

    @staticmethod
    def backward(ctx, _grad_idx, grad_soft, grad_ent):
        zf, codebook, c = ctx.saved_tensors
        need_z, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_soft is None and grad_ent is None or not (need_z or need_e):
            return None, None, None, None, None
        n, t = zf.shape[0], ctx.temperature
        grad_z = torch.empty_like(zf) if need_z else None
        grad_e = torch.zeros_like(codebook) if need_e else None
        c_minus_1 = c - 1.0
        with torch.autocast(device_type=zf.device.type, enabled=False):
            for s, e in _spans(n, ctx.chunk):
                z = zf[s:e]
                logits = z @ codebook.t()
                g = None
                if grad_soft is not None:  # softmax backward of g_soft @ E^T
                    soft = torch.softmax(logits, -1)
                    g = grad_soft[s:e] @ codebook.t()
                    g.sub_(torch.linalg.vecdot(g, soft).unsqueeze(-1)).mul_(soft)
                    del soft
                if grad_ent is not None:
                    logp = torch.log_softmax(logits.div_(t), -1)
                    p = _probs(logits)
                    del logits
                    # d ent / d logp = p (c - 1 - logp) / N, then log_softmax backward: h - p * sum(h)
                    h = logp.neg_().add_(c_minus_1).mul_(p)
                    h.addcmul_(p, h.sum(-1, keepdim=True), value=-1.0)
                    del p
                    scale = grad_ent / (n * t)
                    g = h.mul_(scale) if g is None else g.add_(h.mul_(scale))
                    del h
                else:
                    del logits
                if grad_z is not None:
                    torch.mm(g, codebook, out=grad_z[s:e])
                if grad_e is not None:
                    grad_e.addmm_(g.t(), z)
                del g
        return grad_z, grad_e, None, None, None


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim in fp32, in the logits' own buffer when they are fp32 (one chunk x K tensor)."""
    x = logits.float()
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i) over targets != ignore_index, ``chunk`` rows at a time.

    ``compute_dtype`` is the matmul dtype (bf16 under autocast): the logits are computed in it and upcast to fp32 for
    the softmax, as ``F.cross_entropy(F.linear(h, W).float(), t)`` does under autocast; the gradients of the two
    matmuls are computed in it too and returned in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int, compute_dtype):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s, e in _spans(hidden.shape[0], chunk):
            logits = (h[s:e] @ w.t()).float()
            total += F.cross_entropy(logits, targets[s:e], ignore_index=ignore_index, reduction="sum")
            del logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.ignore_index, ctx.compute_dtype = chunk, ignore_index, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = ctx.compute_dtype
        h, w = hidden.to(cd), weight.to(cd)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s, e in _spans(hidden.shape[0], ctx.chunk):
                t = targets[s:e]
                g = _softmax_(h[s:e] @ w.t())  # d CE / d logits = softmax - one_hot
                valid = t != ctx.ignore_index
                rows = torch.arange(len(t), device=t.device)
                g[rows, t.clamp_min(0)] -= valid.to(g.dtype)
                g.mul_(valid.unsqueeze(-1).to(g.dtype) * grad_total)
                g = g.to(cd)
                if grad_h is not None:
                    grad_h[s:e] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    if cd == torch.float32:
                        grad_w.addmm_(g.t(), h[s:e])
                    else:
                        grad_w += g.t() @ h[s:e]
                del g
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None

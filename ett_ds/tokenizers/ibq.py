"""IBQ (Index Backpropagation Quantization, SEED-Voken): the paper's tokenizer, ``model.tokenizer.type=ibq``.

The quantizer's logits/softmax/entropy run in fp32 whatever the surrounding precision, over token chunks
(``tokenizers/chunked.py``). Its loss terms: ``quant`` (the double quantization loss) and ``entropy`` (MAGVIT-v2's
sample entropy minus batch entropy, with the reference's eps inside the batch log).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TokenizerConfig
from .base import VisionTokenizer, init_codebook
from .chunked import IBQChunked, auto_chunk_tokens, chunked_argmax


def entropy_loss(logits: torch.Tensor, temperature: float, eps: float = 1e-5) -> torch.Tensor:
    """MAGVIT-v2 / IBQ entropy loss: mean per-sample entropy minus the entropy of the batch-mean distribution,
    ``-sum(a * log(a + eps))`` for the batch mean ``a`` (the reference adds eps = 1e-5 there; with K = 131,072 an
    evenly used codebook has a ~ 7.6e-6, below eps, so the eps shapes the gradient). The reference also adds eps to
    the logits before ``log_softmax``, which cancels exactly (log_softmax is shift-invariant), so it is omitted.

    The formula of record; ``IBQuantizer`` computes the same value chunk by chunk (``chunked.IBQChunked``)."""
    logp = F.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    sample_entropy = -(p * logp).sum(-1).mean()
    avg_p = p.mean(0)
    batch_entropy = -(avg_p * torch.log(avg_p + eps)).sum()
    return sample_entropy - batch_entropy


class _SoftPath(torch.autograd.Function):
    """The straight-through soft path without chunking: zero forward, ``g @ E^T`` backward to the softmax."""

    @staticmethod
    def forward(ctx, soft, codebook):
        ctx.save_for_backward(codebook)
        return soft.new_zeros(soft.shape[0], codebook.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (codebook,) = ctx.saved_tensors
        return grad @ codebook.t(), None


def reference_quantize(zf: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, temperature: float = 0.01,
                       eps: float = 1e-5) -> tuple:
    """IBQ on (N, D) rows with every N x K tensor materialised: (z_q, indices, quant loss, entropy loss). The
    formula ``IBQuantizer`` (chunked) must equal, and the 'unchunked' variant ``bench/quantizer_bench.py`` measures."""
    logits = zf @ codebook.t()
    idx = logits.argmax(-1)
    z_hard = F.embedding(idx, codebook)
    z_q = z_hard + _SoftPath.apply(logits.softmax(-1), codebook.detach())
    quant = F.mse_loss(z_q, zf) + F.mse_loss(z_hard.detach(), zf) + beta * F.mse_loss(z_hard, zf.detach())
    return z_q, idx, quant, entropy_loss(logits, temperature, eps)


class IBQuantizer(nn.Module):
    """Index Backpropagation Quantization.

    logits = z . E^T over all K codes; soft = softmax(logits); hard = one_hot(argmax);
    z_q = (hard - sg(soft) + soft) @ E. The product is evaluated without materialising the one-hot:
    ``E[idx] + (soft - sg(soft)) @ sg(E)`` has the same value and the same gradients (to E only through the
    selected rows, to the logits through the soft path), at the cost of one gather instead of a K-wide matmul; the
    soft path's forward, identically zero, is not computed at all.

    The K-wide part (logits, argmax, soft path, entropy loss) runs over chunks of ``chunk_tokens`` tokens
    (``chunked.IBQChunked``): no N x K tensor is kept for backward, each chunk's logits are recomputed there. None
    picks the chunk from a memory budget (``chunked.auto_chunk_tokens``).
    """
    zero3_reads = ("embedding.weight",)  # forward reads the codebook without calling the embedding (engine/zero3)

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, entropy_temperature: float = 0.01,
                 init_std: float | None = None, chunk_tokens: int | None = None, entropy_eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.beta, self.temperature, self.entropy_eps = beta, entropy_temperature, entropy_eps
        self.chunk_tokens = int(chunk_tokens) if chunk_tokens else auto_chunk_tokens(codebook_size)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        init_codebook(self.embedding, init_std)

    def forward(self, z: torch.Tensor, losses: bool = True) -> tuple:
        """(z_q, indices, terms). ``losses=False`` (a frozen tokenizer, inference) computes only the argmax and
        the gathered codes: no K-wide softmax, no entropy, no straight-through path, and no terms."""
        b, d, h, w = z.shape
        terms = {}
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, d)
            codebook = self.embedding.weight.float()
            if losses:
                idx, soft, ent = IBQChunked.apply(zf, codebook, self.temperature, self.chunk_tokens,
                                                  self.entropy_eps)
                z_hard = F.embedding(idx, codebook)
                z_q = z_hard + soft
                terms["quant"] = (F.mse_loss(z_q, zf) + F.mse_loss(z_hard.detach(), zf)
                                  + self.beta * F.mse_loss(z_hard, zf.detach()))
                terms["entropy"] = ent
            else:
                idx = chunked_argmax(zf, codebook, self.chunk_tokens)
                z_q = F.embedding(idx, codebook)
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return z_q, idx.reshape(b, h, w), terms

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook embeddings (..., D) for integer codes."""
        return self.embedding(indices)


class IBQTokenizer(VisionTokenizer):
    """encoder -> quant_conv -> IBQ quantizer -> post_quant_conv -> decoder (fp32); SEED-Voken's key layout."""

    kind = "ibq"

    def build_quantizer(self, cfg: TokenizerConfig) -> nn.Module:
        return IBQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.entropy_temperature, cfg.codebook_init_std,
                           cfg.quantizer_chunk_tokens, cfg.entropy_eps)

    def export_config(self) -> dict:
        return {**super().export_config(), "entropy_temperature": self.cfg.entropy_temperature}

"""The classic VQGAN (taming-transformers), ``model.tokenizer.type=vqgan``: nearest-neighbour quantization with a
straight-through estimator, the tokenizer family of Chameleon/Anole and LlamaGen.

Loss term ``quant`` = ||sg(z) - e||^2 (moves the codebook) + beta ||z - sg(e)||^2 (commits the encoder), the
non-legacy placement of beta (LlamaGen's; taming's ``VectorQuantizer2(legacy=True)`` puts beta on the codebook term).
``model.tokenizer.l2_norm_codes`` l2-normalises both the encoder outputs and the codebook rows before the search,
and a small ``model.tokenizer.code_dim`` gives low-dimensional codes: LlamaGen's VQ-16 uses both (code dim 8).
The codebook is ``quantize.embedding.weight`` (taming's key), so taming checkpoints load key for key.

In ETT the caption gradient reaches the encoder through the straight-through path; the codebook itself moves only
through the ``quant`` term (unlike IBQ, whose soft path hands the LLM's gradient to the codebook too).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TokenizerConfig
from .base import VisionTokenizer, init_codebook
from .chunked import auto_chunk_tokens, chunked_argmax


def nearest_codes(zf: torch.Tensor, codebook: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmin_k ||z - e_k||^2 for every row of ``zf`` = argmax_k (z . e_k - ||e_k||^2 / 2), ``chunk`` rows at a
    time (the ||z||^2 term is the same for every k). No gradient."""
    with torch.no_grad():
        half_sq = codebook.pow(2).sum(-1, keepdim=True) * -0.5
        return chunked_argmax(torch.cat([zf, zf.new_ones(zf.shape[0], 1)], 1), torch.cat([codebook, half_sq], 1),
                              chunk)


class VectorQuantizer(nn.Module):
    zero3_reads = ("embedding.weight",)  # forward reads the codebook without calling the embedding (engine/zero3)

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, l2_norm: bool = False,
                 init_std: float | None = None, chunk_tokens: int | None = None):
        super().__init__()
        self.codebook_size, self.code_dim, self.beta, self.l2_norm = codebook_size, code_dim, beta, l2_norm
        self.chunk_tokens = int(chunk_tokens) if chunk_tokens else auto_chunk_tokens(codebook_size, copies=2)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        init_codebook(self.embedding, init_std)

    def _rows(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=-1) if self.l2_norm else e

    def forward(self, z: torch.Tensor, losses: bool = True) -> tuple:
        """(z_q, indices, terms); ``losses=False`` returns the codebook rows themselves and no terms."""
        b, d, h, w = z.shape
        terms = {}
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = self._rows(z.float().permute(0, 2, 3, 1).reshape(-1, d))
            codebook = self._rows(self.embedding.weight.float())
            idx = (chunked_argmax(zf, codebook, self.chunk_tokens) if self.l2_norm  # unit rows: max cosine
                   else nearest_codes(zf, codebook, self.chunk_tokens))
            z_hard = F.embedding(idx, codebook)
            if losses:
                terms["quant"] = F.mse_loss(z_hard, zf.detach()) + self.beta * F.mse_loss(zf, z_hard.detach())
                z_q = zf + (z_hard - zf).detach()  # straight-through: the value of z_hard, the gradient of zf
            else:
                z_q = z_hard
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return z_q, idx.reshape(b, h, w), terms

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook embeddings (..., D) for integer codes (unit rows with ``l2_norm``)."""
        return self._rows(self.embedding(indices))


class VQGANTokenizer(VisionTokenizer):
    """encoder -> quant_conv -> nearest-neighbour quantizer -> post_quant_conv -> decoder (fp32); taming layout."""

    kind = "vqgan"

    def build_quantizer(self, cfg: TokenizerConfig) -> nn.Module:
        return VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.l2_norm_codes, cfg.codebook_init_std,
                               cfg.quantizer_chunk_tokens)

    def export_config(self) -> dict:
        return {**super().export_config(), "l2_norm_codes": self.cfg.l2_norm_codes}

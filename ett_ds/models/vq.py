"""The IBQ vision tokenizer: a VQGAN-style conv encoder/decoder around an index-backpropagation quantizer.

Module and parameter names follow taming-transformers / SEED-Voken's IBQ (``encoder.down.0.block.1.conv1.weight``,
``quantize.embedding.weight`` ...), so IBQ checkpoints load key for key (see ``ibq_checkpoint.py``).

Precision: the decoder is the reconstruction head and stays in fp32. It is built from ``FP32Conv2d`` (a subclass
that DeepSpeed's torch_autocast does not treat as a bf16-safe module) and runs with autocast disabled on an fp32
input. The quantizer's logits/softmax/entropy run in fp32 whatever the surrounding precision, over token chunks
(``chunked.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TokenizerConfig
from .chunked import IBQChunked, auto_chunk_tokens, chunked_argmax


class FP32Conv2d(nn.Conv2d):
    """A Conv2d that DeepSpeed's autocast (exact-class match on nn.Conv2d) never all-gathers in bf16."""


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm(32) as in taming/IBQ for c >= 64; narrower layers keep >= 2 channels per group (a GroupNorm with
    one channel per group is an instance norm, which erases each channel's mean: colours and backgrounds)."""
    groups = 32
    while groups > 1 and (c % groups or c // groups < 2):
        groups //= 2
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float, conv=nn.Conv2d):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.nin_shortcut = conv(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections, computed through PyTorch SDPA."""

    def __init__(self, c: int, conv=nn.Conv2d):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = conv(c, c, 1), conv(c, c, 1), conv(c, c, 1)
        self.proj_out = conv(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int, conv=nn.Conv2d):
        super().__init__()
        self.conv = conv(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int, conv=nn.Conv2d):
        super().__init__()
        self.conv = conv(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResNets), ``attn`` (optional attention after each block), a resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return resample(h) if resample is not None else h


class _Mid(nn.Module):
    def __init__(self, c: int, dropout: float, conv):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout, conv)
        self.attn_1 = AttnBlock(c, conv)
        self.block_2 = ResnetBlock(c, c, dropout, conv)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult = cfg.ch, list(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, cin = cfg.resolution, ch
        for i, m in enumerate(mult):
            level, cout = _Level(), ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, cfg.dropout))
                cin = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(cin, cfg.dropout, nn.Conv2d)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        conv = FP32Conv2d
        ch, mult = cfg.ch, list(cfg.ch_mult)
        cin = ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = conv(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, cfg.dropout, conv)
        levels = []
        for i in reversed(range(len(mult))):
            level, cout = _Level(), ch * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout, cfg.dropout, conv))
                cin = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cin, conv))
            if i != 0:
                level.upsample = Upsample(cin, conv)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = conv(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        # fp32 island: inputs upcast, autocast off, whatever precision the engine runs in.
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.mid(self.conv_in(z.float()))
            for level in reversed(self.up):
                h = level(h)
            return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class QuantOutput:
    z_q: torch.Tensor  # (B, D, h, w) straight-through codebook embeddings (what the decoder and the LLM read)
    indices: torch.Tensor  # (B, h, w) int64
    quant_loss: torch.Tensor | None  # double quantization loss (scalar); None from ``encode(losses=False)``
    entropy_loss: torch.Tensor | None  # sample entropy - batch entropy (scalar); None likewise


def entropy_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """MAGVIT-v2 entropy loss: mean per-sample entropy minus the entropy of the batch-mean distribution.

    The formula of record; ``IBQuantizer`` computes the same value chunk by chunk (``chunked.IBQChunked``)."""
    logp = F.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    sample_entropy = -(p * logp).sum(-1).mean()
    avg_p = p.mean(0)
    batch_entropy = -(avg_p * torch.log(avg_p.clamp_min(1e-12))).sum()
    return sample_entropy - batch_entropy


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

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, entropy_temperature: float = 0.01,
                 init_std: float | None = None, chunk_tokens: int | None = None):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.beta, self.temperature = beta, entropy_temperature
        self.chunk_tokens = int(chunk_tokens) if chunk_tokens else auto_chunk_tokens(codebook_size)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        if init_std is None:
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        else:
            nn.init.normal_(self.embedding.weight, 0.0, init_std)

    def forward(self, z: torch.Tensor, losses: bool = True) -> tuple:
        """Returns (z_q, indices, quant_loss, entropy_loss) as a plain tuple: ZeRO-3's backward hooks only see
        tensors inside tuples/lists/dicts, so a module must not return a dataclass. ``quantize()`` wraps it.

        ``losses=False`` (a frozen tokenizer, inference) computes only the argmax and the gathered codes: no K-wide
        softmax, no entropy, no straight-through path, and the two losses come back as None."""
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, d)
            codebook = self.embedding.weight.float()
            if losses:
                idx, soft, ent = IBQChunked.apply(zf, codebook, self.temperature, self.chunk_tokens)
                z_hard = F.embedding(idx, codebook)
                z_q = z_hard + soft
                quant_loss = (F.mse_loss(z_q, zf) + F.mse_loss(z_hard.detach(), zf)
                              + self.beta * F.mse_loss(z_hard, zf.detach()))
            else:
                idx = chunked_argmax(zf, codebook, self.chunk_tokens)
                z_q, quant_loss, ent = F.embedding(idx, codebook), None, None
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return z_q, idx.reshape(b, h, w), quant_loss, ent

    def quantize(self, z: torch.Tensor, losses: bool = True) -> QuantOutput:
        return QuantOutput(*self(z, losses))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook embeddings (..., D) for integer codes."""
        return self.embedding(indices)


class VisionTokenizer(nn.Module):
    """encoder -> quant_conv -> IBQ quantizer -> post_quant_conv -> decoder (fp32)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = FP32Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.quantize = IBQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.entropy_temperature,
                                    cfg.codebook_init_std, cfg.quantizer_chunk_tokens)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def encode(self, pixels: torch.Tensor, losses: bool = True) -> QuantOutput:
        """``losses=False`` skips what only training needs (see :meth:`IBQuantizer.forward`)."""
        return self.quantize.quantize(self.quant_conv(self.encoder(pixels)), losses)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z_q.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(z_q.float()))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> pixels in [-1, 1] (approximately)."""
        return self.decode(self.quantize.lookup(indices).permute(0, 3, 1, 2))

    def forward(self, pixels: torch.Tensor):
        """(reconstruction, indices): the autoencoder round trip."""
        q = self.encode(pixels, losses=torch.is_grad_enabled())
        return self.decode(q.z_q), q.indices

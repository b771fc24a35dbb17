"""The taming-transformers convolutional encoder and decoder, shared by every tokenizer here (IBQ and VQGAN differ
only in the quantizer between them).

Module and parameter names follow taming-transformers / SEED-Voken (``encoder.down.0.block.1.conv1.weight``,
``decoder.up.2.upsample.conv.weight`` ...), so their checkpoints load key for key (``checkpoint.py``).

Precision: the decoder is the reconstruction head and stays in fp32. It is built from ``FP32Conv2d`` (a subclass
that DeepSpeed's torch_autocast does not treat as a bf16-safe module) and runs with autocast disabled on an fp32
input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TokenizerConfig


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

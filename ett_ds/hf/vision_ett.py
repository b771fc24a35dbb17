"""The ETT vision tokenizer for the exported Hugging Face model, with torch alone (no ett_ds import).

A taming-style autoencoder: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder, with the module and
parameter names of ett_ds's tokenizers (the taming / SEED-Voken layout), so the export's weights load key for key.
Only inference is here: encode (codes and codebook embeddings, no quantizer losses) and decode.

``config`` is the dict the export writes under ``vision_config`` in config.json: the taming names (``ddconfig``,
``n_embed``, ``embed_dim``), ``type`` (``ibq`` or ``vqgan``), ``l2_norm_codes`` (vqgan) and ``chunk_tokens`` (rows
per chunk of the code search, as in training, so the argmax is computed the same way).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(c: int) -> nn.GroupNorm:
    groups = 32
    while groups > 1 and (c % groups or c // groups < 2):
        groups //= 2
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
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


class Mid(nn.Module):
    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, dd: dict):
        super().__init__()
        ch, mult, dropout = dd["ch"], list(dd["ch_mult"]), dd.get("dropout", 0.0)
        self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, cin = dd["resolution"], ch
        for i, m in enumerate(mult):
            level, cout = Level(), ch * m
            for _ in range(dd["num_res_blocks"]):
                level.block.append(ResnetBlock(cin, cout, dropout))
                cin = cout
                if res in dd["attn_resolutions"]:
                    level.attn.append(AttnBlock(cin))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = Mid(cin, dropout)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, dd["z_channels"], 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, dd: dict):
        super().__init__()
        ch, mult, dropout = dd["ch"], list(dd["ch_mult"]), dd.get("dropout", 0.0)
        cin = ch * mult[-1]
        res = dd["resolution"] // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(dd["z_channels"], cin, 3, padding=1)
        self.mid = Mid(cin, dropout)
        levels = []
        for i in reversed(range(len(mult))):
            level, cout = Level(), ch * mult[i]
            for _ in range(dd["num_res_blocks"] + 1):
                level.block.append(ResnetBlock(cin, cout, dropout))
                cin = cout
                if res in dd["attn_resolutions"]:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, dd["in_channels"], 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _chunked_argmax(zf: torch.Tensor, codebook: torch.Tensor, chunk: int) -> torch.Tensor:
    idx = torch.empty(zf.shape[0], dtype=torch.long, device=zf.device)
    for s in range(0, zf.shape[0], chunk):
        idx[s:s + chunk] = (zf[s:s + chunk] @ codebook.t()).argmax(-1)
    return idx


class Quantizer(nn.Module):
    """The codebook (``embedding``) and the code search: IBQ's argmax of z . e, VQGAN's nearest neighbour (or max
    cosine with l2-normalised codes)."""

    def __init__(self, kind: str, codebook_size: int, code_dim: int, l2_norm: bool, chunk_tokens: int):
        super().__init__()
        self.kind, self.l2_norm, self.chunk_tokens = kind, l2_norm, max(1, int(chunk_tokens))
        self.embedding = nn.Embedding(codebook_size, code_dim)

    def _rows(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=-1) if self.kind == "vqgan" and self.l2_norm else e

    def forward(self, z: torch.Tensor):
        """(B, D, h, w) -> (codebook embeddings (B, D, h, w), codes (B, h, w))."""
        b, d, h, w = z.shape
        zf = self._rows(z.float().permute(0, 2, 3, 1).reshape(-1, d))
        codebook = self._rows(self.embedding.weight.float())
        if self.kind == "vqgan" and not self.l2_norm:  # argmin ||z - e||^2 = argmax z . e - ||e||^2 / 2
            half_sq = codebook.pow(2).sum(-1, keepdim=True) * -0.5
            idx = _chunked_argmax(torch.cat([zf, zf.new_ones(zf.shape[0], 1)], 1), torch.cat([codebook, half_sq], 1),
                                  self.chunk_tokens)
        else:
            idx = _chunked_argmax(zf, codebook, self.chunk_tokens)
        z_q = F.embedding(idx, codebook).reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return z_q, idx.reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self._rows(self.embedding(codes))


class VisionTokenizer(nn.Module):
    """Pixels in [-1, 1] <-> codes; everything in float32 with autocast off (as in training's fp32 island)."""

    def __init__(self, config: dict):
        super().__init__()
        dd = config["ddconfig"]
        self.kind = config.get("type", "ibq")
        self.downsample = 2 ** (len(dd["ch_mult"]) - 1)
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quant_conv = nn.Conv2d(dd["z_channels"], config["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(config["embed_dim"], dd["z_channels"], 1)
        self.quantize = Quantizer(self.kind, config["n_embed"], config["embed_dim"],
                                  bool(config.get("l2_norm_codes", False)), config.get("chunk_tokens") or 128)

    def encode(self, pixels: torch.Tensor):
        """(B, 3, H, W) -> (codebook embeddings (B, D, h, w), codes (B, h, w))."""
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            return self.quantize(self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype))))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z_q.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantize.lookup(codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, H, W) pixels, about [-1, 1]."""
        return self.decode(self.lookup(codes).permute(0, 3, 1, 2))

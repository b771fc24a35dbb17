"""The seam every vision tokenizer implements, and the taming-style autoencoder both built-in ones share.

What the rest of ett_ds may use of a tokenizer (``ETTModel``, evaluation, generation, export, the L_vq objective):

    encode(pixels, losses=True) -> QuantOutput   codes, straight-through codebook embeddings, quantizer losses
    decode(z_q) -> pixels                          (B, D, h, w) embeddings -> (B, C, H, W) in [-1, 1] (fp32)
    lookup(codes) -> embeddings                    (...,) integer codes -> (..., D): what the projector reads
    decode_codes(codes) -> pixels                  (B, h, w) codes -> pixels
    codebook_size, code_dim, downsample            K, D and the pixels per token side
    codebook()                                     the (K, D) parameter the codes index (for diagnostics)
    kind, export_config()                          the registry name and the config file an export writes

The reconstruction objective (``objective.VQObjective``) is the same for every tokenizer: pixel, perceptual and
GAN terms on ``decode``'s output plus whatever quantizer terms the tokenizer reports in ``QuantOutput.terms``.
A new tokenizer subclasses :class:`VisionTokenizer` (or implements the same methods) and registers its ``type``
name in ``ett_ds/tokenizers/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import TokenizerConfig
from .taming import Decoder, Encoder, FP32Conv2d


def init_codebook(embedding: nn.Embedding, std: float | None) -> None:
    """taming / IBQ's uniform(-1/K, 1/K) codebook, or normal(0, std) (``model.tokenizer.codebook_init_std``)."""
    if std is None:
        k = embedding.num_embeddings
        nn.init.uniform_(embedding.weight, -1.0 / k, 1.0 / k)
    else:
        nn.init.normal_(embedding.weight, 0.0, std)


@dataclass
class QuantOutput:
    z_q: torch.Tensor  # (B, D, h, w) straight-through codebook embeddings (what the decoder and the LLM read)
    indices: torch.Tensor  # (B, h, w) int64
    # quantizer losses by name (scalars), each weighted by ``loss.{name}_weight`` in L_vq; empty from
    # ``encode(losses=False)`` (a frozen tokenizer, inference)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class VisionTokenizer(nn.Module):
    """encoder -> quant_conv -> ``self.quantize`` -> post_quant_conv -> decoder (fp32), in the taming key layout.

    Subclasses set ``kind`` and build ``self.quantize``: a module whose ``forward(z, losses)`` returns the plain
    tuple ``(z_q, indices, terms)`` (ZeRO-3's backward hooks only see tensors inside tuples/lists/dicts, so a module
    must not return a dataclass) and whose ``lookup(codes)`` returns embeddings; its codebook is
    ``quantize.embedding`` (an ``nn.Embedding``)."""

    kind = ""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = FP32Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.quantize = self.build_quantizer(cfg)

    def build_quantizer(self, cfg: TokenizerConfig) -> nn.Module:
        raise NotImplementedError

    # -- sizes ---------------------------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def code_dim(self) -> int:
        return self.cfg.code_dim

    def codebook(self) -> nn.Parameter:
        return self.quantize.embedding.weight

    # -- the seam ------------------------------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor, losses: bool = True) -> QuantOutput:
        """``losses=False`` skips what only training needs (soft paths, loss terms)."""
        z_q, indices, terms = self.quantize(self.quant_conv(self.encoder(pixels)), losses)
        return QuantOutput(z_q, indices, terms)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z_q.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(z_q.float()))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook embeddings (..., D) for integer codes, as ``encode`` hands them to the decoder and the LLM."""
        return self.quantize.lookup(codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> pixels in [-1, 1] (approximately)."""
        return self.decode(self.lookup(codes).permute(0, 3, 1, 2))

    def forward(self, pixels: torch.Tensor):
        """(reconstruction, indices): the autoencoder round trip."""
        q = self.encode(pixels, losses=torch.is_grad_enabled())
        return self.decode(q.z_q), q.indices

    def export_config(self) -> dict:
        """The architecture in taming / SEED-Voken naming (``ddconfig``, ``n_embed``, ``embed_dim``), as
        ``checkpoint.tokenizer_config_from_yaml`` reads it back; subclasses add their quantizer's fields."""
        c = self.cfg
        return {"type": self.kind,
                "ddconfig": {"double_z": False, "z_channels": c.z_channels, "resolution": c.resolution,
                             "in_channels": c.in_channels, "out_ch": c.in_channels, "ch": c.ch,
                             "ch_mult": list(c.ch_mult), "num_res_blocks": c.num_res_blocks,
                             "attn_resolutions": list(c.attn_resolutions), "dropout": c.dropout},
                "n_embed": c.codebook_size, "embed_dim": c.code_dim, "beta": c.beta}

"""Vision tokenizers behind one seam (``base.VisionTokenizer``), chosen by ``model.tokenizer.type``.

    ibq     IBQ, the paper's tokenizer (index backpropagation quantization)          ibq.py
    vqgan   taming-transformers VQGAN, nearest-neighbour + straight-through       vqgan.py

Shared: the taming encoder/decoder (``taming.py``), the checkpoint importer for the taming / SEED-Voken key
layout (``checkpoint.py``) and the reconstruction objective L_vq with its discriminator (``objective.py``).
"""
from __future__ import annotations

from ..config import TokenizerConfig
from .base import QuantOutput, VisionTokenizer
from .ibq import IBQTokenizer
from .vqgan import VQGANTokenizer

REGISTRY: dict[str, type[VisionTokenizer]] = {"ibq": IBQTokenizer, "vqgan": VQGANTokenizer}

__all__ = ["REGISTRY", "QuantOutput", "VisionTokenizer", "build_tokenizer"]


def build_tokenizer(cfg: TokenizerConfig) -> VisionTokenizer:
    """The tokenizer ``cfg.type`` names, randomly initialised (load weights with ``checkpoint.load_tokenizer_weights``)."""
    if cfg.type not in REGISTRY:  # a config built in code skips the tree's check (tests/test_config.py: one list)
        raise ValueError(f"model.tokenizer.type: '{cfg.type}' is not one of {', '.join(REGISTRY)}")
    return REGISTRY[cfg.type](cfg)

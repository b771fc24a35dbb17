"""Batches for stages 0 and 3 and tiny trained checkpoints for the inference and export tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.tiny import caption_batch, repeat, tiny_config

CAPTIONS = ["red fox", "blue sun", "a cat", "green tree"]


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Learnable pictures: upsampled low-resolution noise in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(1, h // 4), max(1, w // 4), generator=g) * 2 - 1
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def pixel_batch(trainer, n: int = 4, seed: int = 0) -> dict:
    h, w = trainer.cfg.data.image_size
    return {"pixels": smooth_images(n, h, w, seed), "text": [""] * n}


def mixed_batch(trainer, captions: list[str], t2i: list[bool], seed: int = 0) -> dict:
    """Real Batcher sequences: caption samples and (no prompt dropout) text-to-image samples in one batch."""
    from ett_ds.data.batch import Batcher
    b = Batcher(trainer.cfg, trainer.text, train=False)
    h, w = trainer.cfg.data.image_size
    pixels = smooth_images(len(captions), h, w, seed)
    examples = []
    for px, c, gen in zip(pixels, captions, t2i):
        ids, labels = b.t2i_sequence(c) if gen else b.caption_sequence(c)
        examples.append({"pixels": px, "text": c, "gen": gen, "input_ids": ids, "labels": labels})
    return b.collate(examples)


def trained_checkpoint(spm_model, tmp_path, stage: str, steps: int = 1, *overrides: str):
    """A Trainer of ``stage`` after ``steps`` optimizer steps, saved; returns (trainer, step folder)."""
    from ett_ds.trainer import Trainer
    tr = Trainer(tiny_config(spm_model, tmp_path, f"stage={stage}", "engine.precision=fp32", *overrides))
    if stage == "tokenizer":
        batch = pixel_batch(tr)
    elif stage == "t2i":
        batch = mixed_batch(tr, CAPTIONS, [False, False, True, True])
    else:
        batch = caption_batch(tr, CAPTIONS)
    it = repeat(batch)
    for _ in range(steps):
        tr.train_step(it)
    return tr, tr.save()

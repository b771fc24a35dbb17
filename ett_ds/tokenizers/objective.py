"""L_vq, the tokenizer's reconstruction objective, in one place for every tokenizer type:

    L_vq = l1_weight |x - x_hat|_1 + perceptual_weight P(x_hat, x)
           + sum over the quantizer's terms t of  {t}_weight * t        (IBQ: quant, entropy; VQGAN: quant)
           + gan_weight(step) * G(x_hat)                                 (0 before loss.gan_start_step)

and the other side of the GAN game (the discriminator's hinge + LeCAM loss and its own optimizer). The trainer adds
``loss.alpha * L_vq`` to the LLM's losses (stage ``tokenizer``: L_vq alone); this module is the only place that
names the terms inside L_vq. The discriminator and the perceptual network live outside the DeepSpeed engine, in
fp32, replicated on every rank (``discriminator.py``, ``perceptual.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LossConfig
from .discriminator import GANLoss
from .perceptual import PerceptualLoss


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().mean()


class VQObjective(nn.Module):
    def __init__(self, cfg: LossConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.gan = GANLoss(cfg, in_channels)
        self.perceptual = None
        if cfg.perceptual_weights:
            self.perceptual = PerceptualLoss(cfg.perceptual_weights)

    def term_weight(self, name: str) -> float:
        weight = getattr(self.cfg, f"{name}_weight", None)
        if weight is None:
            raise ValueError(f"the tokenizer reports a loss term '{name}' but loss.{name}_weight does not exist")
        return weight

    def forward(self, pixels: torch.Tensor, recon: torch.Tensor, quantizer_terms: dict[str, torch.Tensor],
                step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_vq, its terms unweighted). ``quantizer_terms`` is ``QuantOutput.terms`` of the same forward."""
        x = pixels.float()
        terms = {"l1": l1_loss(recon, x),
                 "perceptual": self.perceptual(recon, x) if self.perceptual is not None
                 else torch.zeros((), device=x.device)}
        l_vq = self.cfg.l1_weight * terms["l1"] + self.cfg.perceptual_weight * terms["perceptual"]
        for name, value in quantizer_terms.items():
            terms[name] = value
            l_vq = l_vq + self.term_weight(name) * value
        terms["gan_g"] = self.gan.generator_loss(recon)
        l_vq = l_vq + self.gan.weight(step) * terms["gan_g"]
        return l_vq, terms

    # -- the discriminator's side --------------------------------------------------------------------------------
    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, step: int):
        """(its loss, detached terms for logging): hinge + LeCAM on (real, detached fake), weight 0 before
        ``loss.gan_start_step``."""
        d = self.gan.discriminator_loss(real, fake, step)
        loss = d.pop("loss_d")
        return loss, {"loss_d": loss.detach(), **d}

    def backward_discriminator(self, loss: torch.Tensor) -> None:
        self.gan.step(loss, apply=False)

    def apply_step(self, skip: bool = False) -> None:
        self.gan.apply_step(skip=skip)

    def snapshot(self) -> dict:
        """The state a forward changes (LeCAM anchors, BatchNorm statistics), to restore after a skipped step."""
        return {n: b.clone() for n, b in self.gan.named_buffers()}

    def restore(self, snapshot: dict) -> None:
        for n, b in self.gan.named_buffers():
            b.copy_(snapshot[n])

    def trained_parameters(self) -> list[torch.Tensor]:
        return list(self.gan.parameters())

    def extra_state(self) -> dict:
        return self.gan.extra_state()

    def load_extra_state(self, state: dict) -> None:
        self.gan.load_extra_state(state)

"""PatchGAN discriminator and the GAN side of L_vq (hinge + LeCAM), kept outside the DeepSpeed engine.

The discriminator is small and replicated on every rank with its own Adam; its gradients are averaged across ranks
by hand before each step. It runs in fp32 (outside the engine's autocast).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator non-saturating loss: E[-log sigmoid(D(G(z)))] = E[softplus(-D(G(z)))]."""
    return F.softplus(-logits_fake).mean()


def lecam_reg(logits_real: torch.Tensor, logits_fake: torch.Tensor,
              ema_real: torch.Tensor, ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM regulariser: E[relu(D(x) - a_F)^2] + E[relu(a_R - D(G(z)))^2] with EMA anchors a_R, a_F."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class PatchDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator: 4x4 convs, BatchNorm, LeakyReLU(0.2); one logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(channels * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


class GANLoss(nn.Module):
    """Owns the discriminator, its optimizer and the LeCAM anchors; computes both sides of the GAN game."""

    def __init__(self, cfg_loss, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg_loss
        self.disc = PatchDiscriminator(in_channels, cfg_loss.disc_channels, cfg_loss.disc_layers)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.optimizer = torch.optim.Adam(self.disc.parameters(), lr=cfg_loss.disc_lr,
                                          betas=tuple(cfg_loss.disc_betas))

    def weight(self, step: int) -> float:
        return self.cfg.gan_weight if step >= self.cfg.gan_start_step else 0.0

    def generator_loss(self, recon: torch.Tensor) -> torch.Tensor:
        """Non-saturating loss for the tokenizer; the discriminator's weights get no gradient from it."""
        self.disc.requires_grad_(False)
        try:
            return non_saturating_g_loss(self.disc(recon.float()))
        finally:
            self.disc.requires_grad_(True)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> dict:
        """Hinge + LeCAM on (real, detached fake); scaled by 0 before gan_start_step (never skipped)."""
        on = 1.0 if step >= self.cfg.gan_start_step else 0.0
        logits_real = self.disc(real.float())
        logits_fake = self.disc(fake.detach().float())
        d = self.cfg.lecam_decay
        with torch.no_grad():
            self.ema_real.mul_(d).add_((1 - d) * logits_real.mean())
            self.ema_fake.mul_(d).add_((1 - d) * logits_fake.mean())
        hinge = hinge_d_loss(logits_real, logits_fake)
        lecam = lecam_reg(logits_real, logits_fake, self.ema_real, self.ema_fake)
        total = on * (hinge + self.cfg.lecam_weight * lecam)
        return {"loss_d": total, "d_hinge": hinge.detach(), "d_lecam": lecam.detach(),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    def step(self, loss_d: torch.Tensor, apply: bool = True) -> None:
        """Backward of loss_d; when ``apply`` (an accumulation boundary), average grads across ranks and step."""
        loss_d.backward()
        if apply:
            self.apply_step()

    def apply_step(self, skip: bool = False) -> None:
        """Average the accumulated grads across ranks and step; ``skip`` (a step whose loss or gradient norm was
        not finite, decided alike on every rank) drops the grads without updating."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ws = dist.get_world_size()
            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(ws)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def extra_state(self) -> dict:
        return {"disc": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.load_state_dict(state["disc"])
        self.optimizer.load_state_dict(state["optimizer"])

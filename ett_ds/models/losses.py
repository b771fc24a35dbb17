"""Loss functions as pure functions (no module state), each unit-tested against hand-computed values."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over positions whose target is not IGNORE (logits: (N, V), targets: (N,)).

    Computed in fp32, without a host synchronisation. An all-ignored batch gives 0 (connected to the graph).
    """
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return total / (targets != IGNORE).sum().clamp_min(1)


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


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().mean()

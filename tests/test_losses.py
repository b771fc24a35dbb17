"""Every loss term against values computed by hand."""
import math

import pytest
import torch

from ett_ds.config import LossConfig
from ett_ds.models import losses
from ett_ds.models.discriminator import GANLoss, PatchDiscriminator


def test_hinge_d_loss_hand_computed():
    # real: relu(1-2)=0, relu(1-0)=1 -> 0.5 ; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75 ; 0.5*(0.5+0.75)
    v = losses.hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5]))
    assert v.item() == pytest.approx(0.625)


def test_non_saturating_g_loss_hand_computed():
    assert losses.non_saturating_g_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    # -log sigmoid(log 3) = log(1 + 1/3)
    assert losses.non_saturating_g_loss(torch.tensor([math.log(3)])).item() == pytest.approx(math.log(4 / 3))


def test_generator_loss_pushes_fake_logits_up():
    x = torch.tensor([0.0], requires_grad=True)
    losses.non_saturating_g_loss(x).backward()
    assert x.grad.item() == pytest.approx(-0.5)  # d/dx softplus(-x) = -sigmoid(-x)


def test_lecam_hand_computed():
    # relu([1,3] - 0)^2 -> mean 5 ; relu(2 - [-1,1])^2 = [9,1] -> mean 5
    v = losses.lecam_reg(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), torch.tensor(2.0), torch.tensor(0.0))
    assert v.item() == pytest.approx(10.0)


def test_caption_loss_ignores_masked_positions_and_is_log_k_for_uniform_logits():
    logits = torch.zeros(3, 4)
    logits[1] = torch.tensor([0.0, 0.0, 0.0, 50.0])  # a confident wrong position that is masked out
    targets = torch.tensor([2, losses.IGNORE, 0])
    assert losses.caption_loss(logits, targets).item() == pytest.approx(math.log(4))
    all_masked = losses.caption_loss(logits.requires_grad_(), torch.full((3,), losses.IGNORE))
    assert all_masked.item() == 0.0 and all_masked.requires_grad


def test_l1_hand_computed():
    assert losses.l1_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.0])).item() == pytest.approx(0.75)


def test_gan_zero_weight_before_start_but_forward_always_runs():
    cfg = LossConfig(disc_channels=8, disc_layers=2, gan_start_step=5)
    gan = GANLoss(cfg)
    real, fake = torch.rand(2, 3, 16, 32), torch.rand(2, 3, 16, 32)
    d = gan.discriminator_loss(real, fake, step=0)
    assert d["loss_d"].item() == 0.0 and d["d_hinge"].item() > 0  # computed, weighted by 0
    assert gan.weight(0) == 0.0 and gan.weight(5) == cfg.gan_weight
    before = [p.detach().clone() for p in gan.disc.parameters()]
    gan.step(gan.discriminator_loss(real, fake, step=5)["loss_d"])
    assert any(not torch.equal(a, b) for a, b in zip(before, gan.disc.parameters()))


def test_generator_loss_leaves_discriminator_without_grads():
    gan = GANLoss(LossConfig(disc_channels=8, disc_layers=2))
    recon = torch.rand(1, 3, 16, 32, requires_grad=True)
    gan.generator_loss(recon).backward()
    assert recon.grad is not None
    assert all(p.grad is None for p in gan.disc.parameters())
    assert all(p.requires_grad for p in gan.disc.parameters())


def test_patch_discriminator_outputs_a_logit_map():
    d = PatchDiscriminator(3, 8, 3)
    assert d(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_perceptual_loss_from_local_weights_only(tmp_path):
    from ett_ds.models.perceptual import PerceptualLoss, vgg16_features
    with pytest.raises(FileNotFoundError, match="perceptual weights not found"):
        PerceptualLoss(tmp_path / "missing.pth")
    torch.manual_seed(0)
    feats = vgg16_features()
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()} | {"classifier.0.weight": torch.zeros(1)},
               tmp_path / "vgg16.pth")
    loss = PerceptualLoss(tmp_path / "vgg16.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    v = loss(x, y)
    v.backward()
    assert v.item() > 0 and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())

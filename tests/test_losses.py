"""Every loss term against values computed by hand."""
import math

import pytest
import torch

from ett_ds.config import LossConfig
from ett_ds.models import losses
from ett_ds.tokenizers import discriminator, objective
from ett_ds.tokenizers.discriminator import GANLoss, PatchDiscriminator


def test_hinge_d_loss_hand_computed():
    # real: relu(1-2)=0, relu(1-0)=1 -> 0.5 ; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75 ; 0.5*(0.5+0.75)
    v = discriminator.hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5]))
    assert v.item() == pytest.approx(0.625)


def test_non_saturating_g_loss_hand_computed():
    assert discriminator.non_saturating_g_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    # -log sigmoid(log 3) = log(1 + 1/3)
    assert discriminator.non_saturating_g_loss(torch.tensor([math.log(3)])).item() == pytest.approx(math.log(4 / 3))


def test_generator_loss_pushes_fake_logits_up():
    x = torch.tensor([0.0], requires_grad=True)
    discriminator.non_saturating_g_loss(x).backward()
    assert x.grad.item() == pytest.approx(-0.5)  # d/dx softplus(-x) = -sigmoid(-x)


def test_lecam_hand_computed():
    # relu([1,3] - 0)^2 -> mean 5 ; relu(2 - [-1,1])^2 = [9,1] -> mean 5
    v = discriminator.lecam_reg(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), torch.tensor(2.0), torch.tensor(0.0))
    assert v.item() == pytest.approx(10.0)


def test_caption_loss_ignores_masked_positions_and_is_log_k_for_uniform_logits():
    logits = torch.zeros(3, 4)
    logits[1] = torch.tensor([0.0, 0.0, 0.0, 50.0])  # a confident wrong position that is masked out
    targets = torch.tensor([2, losses.IGNORE, 0])
    assert losses.caption_loss(logits, targets).item() == pytest.approx(math.log(4))
    all_masked = losses.caption_loss(logits.requires_grad_(), torch.full((3,), losses.IGNORE))
    assert all_masked.item() == 0.0 and all_masked.requires_grad


def _rel_close(actual, expected, rel=1e-5):
    tol = rel * (expected.abs() + expected.abs().max())
    assert ((actual - expected).abs() <= tol).all(), float(((actual - expected).abs() / tol).max())


def _head_case(n=37, width=24, k=500, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(width, k, bias=False)
    hidden = torch.randn(n, width) * 2
    targets = torch.randint(0, k, (n,))
    targets[::5] = losses.IGNORE
    return head, hidden, targets


@pytest.mark.parametrize("chunk", [1, 6, 1000])
def test_chunked_linear_cross_entropy_equals_caption_loss_of_full_logits(chunk):
    """Issue 12: the chunked head loss (logits never all at once) has the value and, in fp32, the gradients
    (w.r.t. the hidden states and the head weight) of caption_loss(head(hidden)) within 1e-5 relative."""
    head, hidden, targets = _head_case()
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    w = head.weight.detach().clone().requires_grad_(True)
    loss = losses.linear_cross_entropy(h1, w, targets, chunk)
    ref = losses.caption_loss(head(h2), targets)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    (1.7 * loss).backward()
    (1.7 * ref).backward()
    _rel_close(h1.grad, h2.grad)
    _rel_close(w.grad, head.weight.grad)


@pytest.mark.parametrize("chunks", [1, 4, 40])
def test_head_caption_loss_calls_the_module_per_chunk_with_the_same_values_and_gradients(chunks):
    head, hidden, targets = _head_case(seed=1)
    calls = []
    head.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    loss = losses.head_caption_loss(head, h1, targets, chunks)
    n_forward = len(calls)
    loss.backward()
    w_grad, head.weight.grad = head.weight.grad.clone(), None
    ref = losses.caption_loss(head(h2), targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    _rel_close(h1.grad, h2.grad)
    _rel_close(w_grad, head.weight.grad)
    assert n_forward == chunks and max(calls[:chunks]) <= -(-len(hidden) // chunks)


def test_chunked_head_losses_under_bf16_autocast_and_with_every_target_ignored():
    head, hidden, targets = _head_case(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = losses.caption_loss(head(hidden), targets)
        chunked = losses.linear_cross_entropy(hidden, head.weight, targets, 5)
        pieces = losses.head_caption_loss(head, hidden, targets, 3)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits, upcast, per chunk
    torch.testing.assert_close(pieces, ref, rtol=1e-5, atol=1e-5)
    h = hidden.clone().requires_grad_(True)
    none = losses.linear_cross_entropy(h, head.weight, torch.full_like(targets, losses.IGNORE), 4)
    assert none.item() == 0.0
    none.backward()
    assert h.grad is not None and not h.grad.any()


def test_l1_hand_computed():
    assert objective.l1_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.0])).item() == pytest.approx(0.75)


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
    from ett_ds.tokenizers.perceptual import PerceptualLoss, vgg16_features
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


def test_ett_visual_head_loss_equals_the_unchunked_head_and_lm_head_chunks_from_the_shape():
    """ETTModel.generation_loss (t2i) through the chunked CodeHead equals caption_loss of the full logits as before."""
    from ett_ds.config import load_config
    from ett_ds.models.ett import CodeHead, ETTModel
    from tests.tiny import SHRINK
    cfg = load_config("tiny", [*SHRINK, "stage=t2i", "model.llm.text_tokenizer=null"])
    torch.manual_seed(0)
    model = ETTModel(cfg, vocab_size=600, image_token_id=7)
    assert isinstance(model.visual_head, CodeHead) and isinstance(model.visual_head, torch.nn.Linear)
    b, n_img, length, hid = 3, 8, 20, model.visual_head.in_features
    input_ids = torch.randint(10, 600, (b, length))
    input_ids[:, 5:5 + n_img] = 7
    indices = torch.randint(0, cfg.model.tokenizer.codebook_size, (b, 2, 4))
    gen_mask = torch.tensor([1, 0, 1])
    h1 = torch.randn(b, length - 1, hid, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    model.visual_head.chunk_tokens = 3
    loss = model.generation_loss(h1, input_ids, indices, gen_mask)
    is_img = (input_ids[:, 1:] == 7) & gen_mask.view(-1, 1).bool()
    ref = losses.caption_loss(torch.nn.functional.linear(h2[is_img], model.visual_head.weight),
                              indices.flatten(1)[gen_mask.bool()].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward()
    w_grad, model.visual_head.weight.grad = model.visual_head.weight.grad.clone(), None
    ref.backward()
    _rel_close(h1.grad, h2.grad)
    _rel_close(w_grad, model.visual_head.weight.grad)
    assert model.lm_head_chunks(h1) == 1  # the tiny vocabulary's logits fit: no recomputation
    assert model.lm_head_chunks(torch.empty(10 ** 4, 10 ** 3, 1)) > 1  # many rows of targets: pieces


def _objective(**kw):
    from ett_ds.tokenizers.objective import VQObjective
    torch.manual_seed(0)
    return VQObjective(LossConfig(disc_channels=8, disc_layers=2, **kw))


def test_l_vq_is_the_weighted_sum_of_its_terms_with_the_gan_schedule():
    """L_vq = l1_w L1 + perc_w P + sum_t t_w t + gan_w(step) G: the quantizer's terms are weighted by
    loss.{name}_weight, the GAN term counts only from gan_start_step, and every term is reported unweighted."""
    obj = _objective(l1_weight=2.0, quant_weight=3.0, entropy_weight=0.5, gan_weight=0.1, gan_start_step=10)
    x = torch.zeros(1, 3, 16, 16)
    recon = torch.full((1, 3, 16, 16), 0.25)
    q = {"quant": torch.tensor(0.2), "entropy": torch.tensor(-1.0)}
    before, terms = obj(x, recon, q, step=9)
    assert terms["l1"].item() == pytest.approx(0.25) and terms["perceptual"].item() == 0.0
    assert set(terms) == {"l1", "perceptual", "quant", "entropy", "gan_g"}
    assert before.item() == pytest.approx(2.0 * 0.25 + 3.0 * 0.2 + 0.5 * -1.0)
    after, terms = obj(x, recon, q, step=10)
    assert after.item() == pytest.approx(before.item() + 0.1 * terms["gan_g"].item())
    with pytest.raises(ValueError, match="loss.codebook_weight does not exist"):
        obj(x, recon, {"codebook": torch.tensor(1.0)}, step=0)


@pytest.mark.parametrize("uses_llm,alpha", [(True, 0.25), (True, 0.05), (False, 0.25)])
def test_trainer_total_is_caption_plus_alpha_times_l_vq(uses_llm, alpha):
    """The trainer's loss is L_cap (+ L_t2i) + alpha L_vq (stage tokenizer: L_vq alone), with L_vq from the
    objective: models.losses.total_loss (what Trainer.forward returns) on a real VQObjective."""
    from ett_ds.models.losses import total_loss
    obj = _objective(gan_start_step=100)
    x, recon = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), -0.5)
    out = {"recon": recon, "quantizer_terms": {"quant": torch.tensor(0.4), "entropy": torch.tensor(-0.3)}}
    if uses_llm:
        out.update(loss_cap=torch.tensor(2.0), loss_t2i=torch.tensor(1.5))
    total, terms = total_loss(out, {"pixels": x}, obj, alpha if uses_llm else 1.0, 3, torch.device("cpu"))
    l_vq = 1.0 * 0.5 + 1.0 * 0.4 + 0.05 * -0.3  # default l1 / quant / entropy weights, GAN off before step 100
    expected = (2.0 + 1.5 + alpha * l_vq) if uses_llm else l_vq
    assert terms["loss_vq"].item() == pytest.approx(l_vq)
    assert total.item() == pytest.approx(expected) and terms["loss"].item() == pytest.approx(expected)

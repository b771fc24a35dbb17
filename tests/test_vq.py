"""The IBQ tokenizer: shapes, the quantizer's maths against a literal reference, and fp32 islands."""
import math

import pytest
import torch
import torch.nn.functional as F

from ett_ds.config import TokenizerConfig
from ett_ds.tokenizers.base import QuantOutput
from ett_ds.tokenizers.ibq import IBQTokenizer as VisionTokenizer
from ett_ds.tokenizers.ibq import IBQuantizer, entropy_loss, reference_quantize
from ett_ds.tokenizers.taming import FP32Conv2d

TINY = TokenizerConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], resolution=32,
                       z_channels=32, codebook_size=64, code_dim=16)


def reference_ibq(z, codebook, beta=0.25, temperature=0.01, eps=1e-5):
    """IBQ exactly as written in the paper/code: a materialised straight-through one-hot times the codebook, and the
    reference's entropy loss with eps inside both logs."""
    b, d, h, w = z.shape
    zf = z.permute(0, 2, 3, 1).reshape(-1, d)
    logits = zf @ codebook.t()
    soft = logits.softmax(-1)
    hard = F.one_hot(soft.argmax(-1), codebook.shape[0]).to(soft.dtype)
    one_hot = hard - soft.detach() + soft
    z_q = one_hot @ codebook
    z_q2 = hard @ codebook
    quant = F.mse_loss(z_q, zf) + F.mse_loss(z_q2.detach(), zf) + beta * F.mse_loss(z_q2, zf.detach())
    p = (logits / temperature).softmax(-1)
    ent = -(p * F.log_softmax(logits / temperature + eps, -1)).sum(-1).mean()
    avg = p.mean(0)
    ent = ent - (-(avg * (avg + eps).log()).sum())
    return z_q.reshape(b, h, w, d).permute(0, 3, 1, 2), quant, ent


def unchunked_ibq(z, codebook, beta=0.25, temperature=0.01):
    """The quantizer's formula before chunking (issue 12), kept as the reference: every N x K tensor materialised."""
    b, d, h, w = z.shape
    z_q, idx, quant, ent = reference_quantize(z.float().permute(0, 2, 3, 1).reshape(-1, d), codebook, beta,
                                              temperature)
    return z_q.reshape(b, h, w, d).permute(0, 3, 1, 2), idx.reshape(b, h, w), quant, ent


def _rel_close(actual, expected, rel=1e-5):
    """Element-wise within rel x (|expected| + the tensor's largest magnitude): 1e-5 relative in fp32."""
    tol = rel * (expected.abs() + expected.abs().max())
    assert ((actual - expected).abs() <= tol).all(), float(((actual - expected).abs() / tol).max())


@pytest.mark.parametrize("codebook,dim,shape,chunk,temperature,init", [
    (64, 16, (2, 3, 5), 7, 0.01, "normal"),  # uneven chunks
    (512, 16, (3, 4, 5), 1, 0.01, "normal"),  # one token per chunk
    (300, 8, (1, 4, 4), 1000, 1.0, "normal"),  # one chunk
    (4096, 32, (2, 8, 8), 24, 0.01, "ibq"),  # IBQ's uniform(-1/K, 1/K) init: near-uniform logits
    (2048, 16, (1, 2, 3), 4, 0.1, "normal"),  # another temperature, six tokens over 2,048 codes
])
def test_chunked_quantizer_equals_the_unchunked_formula(codebook, dim, shape, chunk, temperature, init):
    """Issue 12: indices and z_q identical, quant and entropy losses equal, gradients w.r.t. the encoder output and
    the codebook within 1e-5 relative (fp32), for a loss that uses z_q, both loss terms and arbitrary weights."""
    torch.manual_seed(0)
    q = IBQuantizer(codebook, dim, entropy_temperature=temperature, chunk_tokens=chunk)
    if init == "normal":
        q.embedding.weight.data.normal_()
    z = torch.randn(shape[0], dim, *shape[1:])
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    cb = q.embedding.weight.detach().clone().requires_grad_(True)
    zq, idx, terms = q(z1)
    quant, ent = terms["quant"], terms["entropy"]
    rzq, ridx, rquant, rent = unchunked_ibq(z2, cb, temperature=temperature)
    assert torch.equal(idx, ridx) and torch.equal(zq, rzq)
    if init == "normal" and temperature < 0.05:  # batch probabilities both far below and above the eps (1e-5)
        avg = ((z.permute(0, 2, 3, 1).reshape(-1, dim) @ cb.detach().t()) / temperature).softmax(-1).mean(0)
        assert (avg < 1e-7).any() and (avg >= 1e-3).any()
    torch.testing.assert_close(quant, rquant, rtol=1e-6, atol=0)
    # the entropy loss is a difference of two fp32 entropies of size up to log K: its rounding scales with log K,
    # and the summation order (threads, CPU) moves it by a few ulps of those terms (seen: 9.5e-7 at K = 4,096)
    torch.testing.assert_close(ent, rent, rtol=1e-6, atol=4e-7 * math.log(codebook))
    g = torch.randn_like(zq)
    ((zq * g).sum() + 0.9 * quant + 0.05 * ent).backward()
    ((rzq * g).sum() + 0.9 * rquant + 0.05 * rent).backward()
    _rel_close(z1.grad, z2.grad)
    _rel_close(q.embedding.weight.grad, cb.grad)


@pytest.mark.parametrize("term", ["z_q", "entropy"])
def test_chunked_quantizer_gradients_of_each_term_alone(term):
    """An output that does not reach the loss gets no gradient (None), and the other term's gradient is exact."""
    torch.manual_seed(1)
    q = IBQuantizer(256, 8, chunk_tokens=5)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 8, 3, 3)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    cb = q.embedding.weight.detach().clone().requires_grad_(True)
    zq, _, terms = q(z1)
    ent = terms["entropy"]
    rzq, _, _, rent = unchunked_ibq(z2, cb)
    g = torch.randn_like(zq)
    ((zq * g).sum() if term == "z_q" else ent).backward()
    ((rzq * g).sum() if term == "z_q" else rent).backward()
    _rel_close(z1.grad, z2.grad)
    _rel_close(q.embedding.weight.grad, cb.grad)


def test_quantizer_chunk_size_from_config_and_budget():
    from ett_ds.tokenizers.chunked import CHUNK_BUDGET_BYTES, auto_chunk_tokens
    assert IBQuantizer(131072, 4).chunk_tokens == auto_chunk_tokens(131072) == 128
    assert 4 * 4 * 131072 * auto_chunk_tokens(131072) <= CHUNK_BUDGET_BYTES
    assert auto_chunk_tokens(10 ** 9) == 8  # never below one small chunk
    tok = VisionTokenizer(TokenizerConfig(**{**TINY.__dict__, "quantizer_chunk_tokens": 12}))
    assert tok.quantize.chunk_tokens == 12


def test_quantizer_matches_literal_one_hot_reference_values_and_gradients():
    torch.manual_seed(0)
    q = IBQuantizer(64, 16)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 16, 3, 5, requires_grad=True)
    out = QuantOutput(*q(z))
    z2 = z.detach().clone().requires_grad_(True)
    cb = q.embedding.weight.detach().clone().requires_grad_(True)
    ref_zq, ref_quant, ref_ent = reference_ibq(z2, cb)
    torch.testing.assert_close(out.z_q, ref_zq)
    torch.testing.assert_close(out.terms["quant"], ref_quant)
    torch.testing.assert_close(out.terms["entropy"], ref_ent, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ref_zq)
    ((out.z_q * g).sum() + out.terms["quant"]).backward()
    ((ref_zq * g).sum() + ref_quant).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(q.embedding.weight.grad, cb.grad)
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.long


def test_encoding_without_losses_gives_the_same_codes_and_embeddings():
    """losses=False (frozen tokenizer, inference) skips the softmax and entropy; codes and z_q are unchanged."""
    torch.manual_seed(0)
    tok = VisionTokenizer(TokenizerConfig(**{**TINY.__dict__, "quantizer_chunk_tokens": 5})).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        full, fast = tok.encode(x), tok.encode(x, losses=False)
    assert torch.equal(full.indices, fast.indices) and torch.equal(full.z_q, fast.z_q)
    assert set(full.terms) == {"quant", "entropy"} and fast.terms == {}


def test_gradient_reaches_every_code_through_the_soft_path():
    torch.manual_seed(0)
    q = IBQuantizer(32, 8)
    z = torch.randn(1, 8, 2, 2)
    q(z)[0].sum().backward()
    assert (q.embedding.weight.grad.abs().sum(1) > 0).all()


def test_entropy_loss_hand_computed():
    # two samples, two codes, T=1: p1=(1,0)-ish is avoided; use equal logits -> sample entropy log2, batch log2 -> 0
    logits = torch.zeros(2, 2)
    # (eps = 0: the textbook formula; the reference's eps is pinned in the test below)
    assert abs(entropy_loss(logits, 1.0, eps=0.0).item()) < 1e-6
    # confident and diverse: sample entropy ~0, batch entropy log 2 -> -log 2
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert abs(entropy_loss(logits, 1.0, eps=0.0).item() + torch.log(torch.tensor(2.0)).item()) < 1e-4


def test_entropy_loss_eps_inside_the_batch_log_hand_computed():
    """Issue 17: the reference's eps = 1e-5 sits inside log(mean p + eps). One sample, two codes, T = 1, logits
    (0, ln 1e-5): p = (1, 1e-5) / (1 + 1e-5); loss = H(p) + sum_k p_k log(p_k + eps), written out with math."""
    import math
    r = 1e-5
    p = [1 / (1 + r), r / (1 + r)]
    h = -sum(pk * math.log(pk) for pk in p)
    expected = h + sum(pk * math.log(pk + 1e-5) for pk in p)
    logits = torch.tensor([[0.0, math.log(r)]], dtype=torch.float64)
    assert entropy_loss(logits, 1.0).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    without = h + sum(pk * math.log(pk) for pk in p)  # no eps: exactly 0 for one sample
    assert entropy_loss(logits, 1.0, eps=0.0).item() == pytest.approx(without, abs=1e-12)
    assert abs(expected - without) > 5e-6  # the eps is visible at these probabilities
    # the configured eps reaches the quantizer (the chunked path) and agrees with the formula
    for eps in (1e-5, 1e-3):
        q = IBQuantizer(2, 1, entropy_temperature=1.0, entropy_eps=eps)
        q.embedding.weight.data = torch.tensor([[0.0], [1.0]])
        z = torch.tensor([[[[0.0]]], [[[math.log(r)]]]]).permute(1, 0, 2, 3).reshape(1, 1, 1, 2)
        zf = z.permute(0, 2, 3, 1).reshape(-1, 1)
        ent = q(z)[2]["entropy"]
        assert ent.item() == pytest.approx(entropy_loss(zf @ q.embedding.weight.t(), 1.0, eps).item(), rel=1e-5)


def test_entropy_eps_comes_from_the_config():
    tok = VisionTokenizer(TokenizerConfig(**{**TINY.__dict__, "entropy_eps": 3e-4}))
    assert tok.quantize.entropy_eps == 3e-4 and TokenizerConfig().entropy_eps == 1e-5


def test_tokenizer_shapes_downsampling_and_fp32_decoder_under_autocast():
    torch.manual_seed(0)
    tok = VisionTokenizer(TINY)
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = tok.encode(x)
        recon = tok.decode(q.z_q)
    assert q.indices.shape == (2, 8, 16)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert all(isinstance(m, FP32Conv2d) for m in tok.decoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert type(tok.post_quant_conv) is FP32Conv2d


def test_attention_blocks_sit_where_configured():
    tok = VisionTokenizer(TINY)
    names = [n for n, _ in tok.named_modules() if n.endswith(".q")]
    assert "encoder.down.2.attn.0.q" in names and "encoder.mid.attn_1.q" in names
    assert "decoder.up.2.attn.0.q" in names and "decoder.up.0.attn.0.q" not in names

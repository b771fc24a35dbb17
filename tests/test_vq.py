"""The IBQ tokenizer: shapes, the quantizer's maths against a literal reference, and fp32 islands."""
import pytest
import torch
import torch.nn.functional as F

from ett_ds.config import TokenizerConfig
from ett_ds.models.vq import FP32Conv2d, IBQuantizer, VisionTokenizer, entropy_loss

TINY = TokenizerConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], resolution=32,
                       z_channels=32, codebook_size=64, code_dim=16)


def reference_ibq(z, codebook, beta=0.25, temperature=0.01):
    """IBQ exactly as written in the paper/code: a materialised straight-through one-hot times the codebook."""
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
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    avg = p.mean(0)
    ent = ent - (-(avg * avg.clamp_min(1e-12).log()).sum())
    return z_q.reshape(b, h, w, d).permute(0, 3, 1, 2), quant, ent


class _SoftPathRef(torch.autograd.Function):
    """The landed (pre-chunking) soft path: zero forward, g @ E^T backward."""

    @staticmethod
    def forward(ctx, soft, codebook):
        ctx.save_for_backward(codebook)
        return soft.new_zeros(soft.shape[0], codebook.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (codebook,) = ctx.saved_tensors
        return grad @ codebook.t(), None


def unchunked_ibq(z, codebook, beta=0.25, temperature=0.01):
    """The quantizer's formula before chunking (issue 12), kept as the reference: every N x K tensor materialised."""
    b, d, h, w = z.shape
    zf = z.float().permute(0, 2, 3, 1).reshape(-1, d)
    logits = zf @ codebook.t()
    idx = logits.argmax(-1)
    z_hard = F.embedding(idx, codebook)
    soft = logits.softmax(-1)
    z_q = z_hard + _SoftPathRef.apply(soft, codebook.detach())
    quant = F.mse_loss(z_q, zf) + F.mse_loss(z_hard.detach(), zf) + beta * F.mse_loss(z_hard, zf.detach())
    ent = entropy_loss(logits, temperature)
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
    zq, idx, quant, ent = q(z1)
    rzq, ridx, rquant, rent = unchunked_ibq(z2, cb, temperature=temperature)
    assert torch.equal(idx, ridx) and torch.equal(zq, rzq)
    if init == "normal" and temperature < 0.05:  # both sides of the batch distribution's 1e-12 clamp are exercised
        avg = ((z.permute(0, 2, 3, 1).reshape(-1, dim) @ cb.detach().t()) / temperature).softmax(-1).mean(0)
        assert (avg < 1e-12).any() and (avg >= 1e-12).any()
    torch.testing.assert_close(quant, rquant, rtol=1e-6, atol=0)
    torch.testing.assert_close(ent, rent, rtol=1e-6, atol=1e-7)
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
    zq, _, _, ent = q(z1)
    rzq, _, _, rent = unchunked_ibq(z2, cb)
    g = torch.randn_like(zq)
    ((zq * g).sum() if term == "z_q" else ent).backward()
    ((rzq * g).sum() if term == "z_q" else rent).backward()
    _rel_close(z1.grad, z2.grad)
    _rel_close(q.embedding.weight.grad, cb.grad)


def test_quantizer_chunk_size_from_config_and_budget():
    from ett_ds.models.chunked import CHUNK_BUDGET_BYTES, auto_chunk_tokens
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
    out = q.quantize(z)
    z2 = z.detach().clone().requires_grad_(True)
    cb = q.embedding.weight.detach().clone().requires_grad_(True)
    ref_zq, ref_quant, ref_ent = reference_ibq(z2, cb)
    torch.testing.assert_close(out.z_q, ref_zq)
    torch.testing.assert_close(out.quant_loss, ref_quant)
    torch.testing.assert_close(out.entropy_loss, ref_ent, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ref_zq)
    ((out.z_q * g).sum() + out.quant_loss).backward()
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
    assert full.quant_loss is not None and fast.quant_loss is None and fast.entropy_loss is None


def test_gradient_reaches_every_code_through_the_soft_path():
    torch.manual_seed(0)
    q = IBQuantizer(32, 8)
    z = torch.randn(1, 8, 2, 2)
    q.quantize(z).z_q.sum().backward()
    assert (q.embedding.weight.grad.abs().sum(1) > 0).all()


def test_entropy_loss_hand_computed():
    # two samples, two codes, T=1: p1=(1,0)-ish is avoided; use equal logits -> sample entropy log2, batch log2 -> 0
    logits = torch.zeros(2, 2)
    assert abs(entropy_loss(logits, 1.0).item()) < 1e-6
    # confident and diverse: sample entropy ~0, batch entropy log 2 -> -log 2
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert abs(entropy_loss(logits, 1.0).item() + torch.log(torch.tensor(2.0)).item()) < 1e-4


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

"""The second tokenizer behind the seam: a taming-transformers VQGAN (``model.tokenizer.type=vqgan``).

Its quantizer against hand-written maths, its checkpoint importer against the taming ``VQModel`` key layout written
out here from taming's architecture (not from ett_ds's modules), and the stages and export running with it."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from ett_ds.config import TokenizerConfig
from ett_ds.tokenizers import REGISTRY, build_tokenizer
from ett_ds.tokenizers.checkpoint import load_tokenizer_weights, tokenizer_config_from_yaml
from ett_ds.tokenizers.vqgan import VectorQuantizer, VQGANTokenizer

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

# the tiny recipe's tokenizer shape, with the tests' attention resolution (tests/tiny.py SHRINK)
DD = {"double_z": False, "z_channels": 64, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 16,
      "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
N_EMBED, EMBED_DIM = 96, 8


def taming_vqmodel_shapes(dd: dict, n_embed: int, embed_dim: int) -> dict[str, tuple]:
    """Every parameter of taming-transformers' ``VQModel`` (``taming/modules/diffusionmodules/model.py`` Encoder /
    Decoder without timestep embedding, ``VectorQuantizer2``) for ``ddconfig`` ``dd``, with its shape."""
    out = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    ch, mult, nrb, res = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["resolution"]
    conv("encoder.conv_in", ch, dd["in_channels"], 3)
    block_in = ch
    for i, m in enumerate(mult):
        block_in = ch * ([1] + mult)[i]
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
            if res in dd["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for part in ("encoder", "decoder"):
        c = block_in
        resnet(f"{part}.mid.block_1", c, c), attn(f"{part}.mid.attn_1", c), resnet(f"{part}.mid.block_2", c, c)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", dd["z_channels"], block_in, 3)
    conv("decoder.conv_in", block_in, dd["z_channels"], 3)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if res in dd["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", dd["out_ch"], block_in, 3)
    conv("quant_conv", embed_dim, dd["z_channels"], 1), conv("post_quant_conv", dd["z_channels"], embed_dim, 1)
    out["quantize.embedding.weight"] = (n_embed, embed_dim)
    return out


def write_taming(tmp_path):
    """A Lightning checkpoint as taming's VQModel writes it (its discriminator and LPIPS under loss.*) and the
    model YAML (``model.params``)."""
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.randn(s, generator=g) * 0.1 for k, s in taming_vqmodel_shapes(DD, N_EMBED, EMBED_DIM).items()}
    sd = dict(weights)
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": sd}, ckpt)
    cfg_path = tmp_path / "vqgan.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DD, "lossconfig": {"target": "x"}}}}))
    return ckpt, cfg_path, weights


def test_registry_builds_each_type_behind_the_seam():
    assert set(REGISTRY) == {"ibq", "vqgan"}
    for kind in REGISTRY:
        tok = build_tokenizer(TokenizerConfig(type=kind, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                              z_channels=8, codebook_size=16, code_dim=4))
        assert tok.kind == kind and tok.downsample == 2 and tok.codebook_size == 16 and tok.code_dim == 4
        q = tok.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
        assert q.z_q.shape == (2, 4, 4, 4) and q.indices.shape == (2, 4, 4) and "quant" in q.terms
        torch.testing.assert_close(tok.lookup(q.indices).permute(0, 3, 1, 2), q.z_q)
        assert tok.decode_codes(q.indices).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="'magvit' is not one of ibq, vqgan"):
        build_tokenizer(TokenizerConfig(type="magvit"))


@pytest.mark.parametrize("chunk", [3, 1000])
def test_nearest_neighbour_codes_straight_through_and_commitment(chunk):
    """idx = argmin ||z - e_k||^2; z_q has the codebook's values and z's gradient (straight-through);
    quant = ||sg(z) - e||^2 + beta ||z - sg(e)||^2, whose gradient moves e towards z and commits z to e."""
    torch.manual_seed(0)
    q = VectorQuantizer(40, 6, beta=0.25, chunk_tokens=chunk)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 6, 3, 4, requires_grad=True)
    z_q, idx, terms = q(z)
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    e = q.embedding.weight.detach()
    want = torch.cdist(zf, e).argmin(-1)
    assert torch.equal(idx.flatten(), want)
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, 6), e[want])
    sq = (zf - e[want]).pow(2).mean()
    torch.testing.assert_close(terms["quant"], sq * 1.25)
    g = torch.randn_like(z_q)
    ((z_q * g).sum() + terms["quant"]).backward()
    n = zf.numel()
    commit = 0.25 * 2 * (zf - e[want]) / n  # d/dz of beta ||z - sg(e)||^2 (mean)
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 6), g.permute(0, 2, 3, 1).reshape(-1, 6)
                               + commit)
    pull = torch.zeros_like(e).index_add_(0, want, 2 * (e[want] - zf) / n)  # d/de of ||sg(z) - e||^2
    torch.testing.assert_close(q.embedding.weight.grad, pull)


def test_l2_normalised_low_dimensional_codes():
    """LlamaGen VQ-16's options: unit-norm rows, the code of maximal cosine similarity, 8-dimensional codes."""
    torch.manual_seed(0)
    q = VectorQuantizer(50, 8, l2_norm=True)
    z = torch.randn(1, 8, 2, 3) * 5
    z_q, idx, _ = q(z)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(1, 2, 3), atol=1e-5)
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    e = F.normalize(q.embedding.weight.detach(), dim=-1)
    assert torch.equal(idx.flatten(), (zf @ e.t()).argmax(-1))
    torch.testing.assert_close(q.lookup(idx).norm(dim=-1), torch.ones(1, 2, 3))


def test_taming_checkpoint_loads_key_for_key(tmp_path):
    ckpt, cfg_path, weights = write_taming(tmp_path)
    cfg = tokenizer_config_from_yaml(cfg_path, TokenizerConfig(type="vqgan"))
    assert (cfg.type, cfg.codebook_size, cfg.code_dim, cfg.ch_mult) == ("vqgan", N_EMBED, EMBED_DIM, DD["ch_mult"])
    tok = VQGANTokenizer(cfg)
    own = tok.state_dict()
    assert set(own) == set(weights)  # the same keys as taming's VQModel, nothing more, nothing less
    report = load_tokenizer_weights(tok, ckpt)
    assert report["tensors"] == len(weights)
    assert all(torch.equal(tok.state_dict()[k], weights[k]) for k in weights)


def test_a_taming_config_under_the_wrong_type_is_one_clear_error(tmp_path):
    from ett_ds.checkpoint import CheckpointError
    _, cfg_path, _ = write_taming(tmp_path)
    with pytest.raises(CheckpointError, match="describes a vqgan tokenizer but model.tokenizer.type=ibq"):
        tokenizer_config_from_yaml(cfg_path, TokenizerConfig(type="ibq"))


def test_vqgan_stages_and_export_round_trip(tmp_path):
    """ETT trains a VQGAN end to end; a taming checkpoint goes in through model.tokenizer.checkpoint, the tokenizer
    stays frozen in stage 1, and the export writes it back bit for bit with a config that reads back."""
    from ett_ds import export
    from ett_ds.engine import dist
    from tests.stage_batches import trained_checkpoint
    from tests.tiny import train_spm
    dist.init_distributed()
    spm = train_spm(tmp_path / "spm")
    ckpt, cfg_path, weights = write_taming(tmp_path)
    tok_args = ["model.tokenizer.type=vqgan", f"model.tokenizer.checkpoint={ckpt}",
                f"model.tokenizer.checkpoint_config={cfg_path}"]
    tr, _ = trained_checkpoint(spm, tmp_path / "ett", "ett", 2, *tok_args)
    moved = tr.model.tokenizer.codebook().detach()
    assert tr.model.tokenizer.kind == "vqgan" and not torch.equal(moved, weights["quantize.embedding.weight"])
    _, step = trained_checkpoint(spm, tmp_path / "align", "align", 1, *tok_args)
    out = tmp_path / "export"
    assert export.main(["--ckpt", str(step), "--out", str(out)]) == 0
    from safetensors import safe_open
    with safe_open(str(out / "tokenizer.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "vqgan"
        assert set(f.keys()) == set(weights)
        assert all(torch.equal(f.get_tensor(k), weights[k]) for k in weights)
    layout = json.loads((out / "tokenizer_config.json").read_text())
    assert layout["n_embed"] == N_EMBED and layout["ddconfig"]["ch_mult"] == DD["ch_mult"]
    back = tokenizer_config_from_yaml(out / "tokenizer_config.json", TokenizerConfig(type="vqgan"))
    assert (back.codebook_size, back.code_dim, back.z_channels) == (N_EMBED, EMBED_DIM, DD["z_channels"])
    from ett_ds.models.loading import load_model
    from tests.stage_batches import smooth_images
    exported = load_model(out).model.tokenizer  # the export folder rebuilds a VQGAN with the same codes
    ref = VQGANTokenizer(tokenizer_config_from_yaml(cfg_path, TokenizerConfig(type="vqgan")))
    load_tokenizer_weights(ref, ckpt)
    px = smooth_images(2, 16, 32, seed=4)
    with torch.no_grad():
        assert exported.kind == "vqgan" and torch.equal(exported.encode(px, False).indices, ref.encode(px, False).indices)


def test_every_stage_evaluate_and_infer_run_with_a_vqgan(tmp_path, capsys):
    """The tiny recipe with model.tokenizer.type=vqgan through the CLIs on demo shards: stage 0, ETT, the index
    baseline, SFT and t2i each train; evaluate and infer read the results."""
    from ett_ds import infer
    from ett_ds.evaluate import main as evaluate
    from ett_ds.train import main as train
    from tests.tiny import build_demo, demo_train_args
    demo = build_demo(tmp_path / "demo", 32, 6, 16)
    out = tmp_path / "runs"

    def run(name, stage, *extra):
        args = demo_train_args(demo, out, "model.tokenizer.type=vqgan", "train.image_every=0", f"name={name}",
                               f"stage={stage}", "train.max_steps=1", *extra)
        assert train(args) == 0, name
        return out / name / "checkpoints" / "step_00000001"

    tok = run("tok", "tokenizer")
    ett = run("ett", "ett", f"train.init_from={tok}")
    run("index", "frozen", "model.visual_input=index", f"train.init_from={tok}")
    run("sft", "sft", f"train.init_from={ett}")
    t2i = run("t2i", "t2i", f"train.init_from={ett}")
    metrics = tmp_path / "m.json"
    assert evaluate(["--ckpt", str(t2i), "--data", f"{demo}/heldout", "--tasks", "recon,caption,t2i",
                     "--out", str(metrics), "--batch-size", "3", "--ocr", "off"]) == 0
    m = json.loads(metrics.read_text())
    assert m["num_samples"] == 6 and m["stage"] == "t2i" and "psnr" in json.dumps(m)
    png = tmp_path / "g.png"
    assert infer.main(["generate", "--ckpt", str(t2i), "--prompt", "123", "--device", "cpu", "--out", str(png)]) == 0
    assert png.is_file()
    from PIL import Image
    Image.new("RGB", (64, 32), (250, 250, 250)).save(tmp_path / "white.png")
    capsys.readouterr()
    assert infer.main(["caption", "--ckpt", str(ett), "--image", str(tmp_path / "white.png"), "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # one caption for one image

"""Export round trip: a ZeRO-3 training checkpoint -> HF LLM + IBQ tokenizer + parts, and back."""
import json

import pytest
import torch

from ett_ds import export
from ett_ds.data.batch import Batcher
from ett_ds.engine import dist
from ett_ds.engine.zero3 import no_zero_init
from ett_ds.models.loading import load_model
from ett_ds.tokenizers.checkpoint import load_tokenizer_weights, tokenizer_config_from_yaml
from ett_ds.tokenizers.ibq import IBQTokenizer as VisionTokenizer
from tests.stage_batches import smooth_images, trained_checkpoint
from tests.tiny import train_spm


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    dist.init_distributed()
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def t2i_step(spm, tmp_path_factory):
    return trained_checkpoint(spm, tmp_path_factory.mktemp("runs"), "t2i", 2)[1]


@torch.no_grad()
def outputs(loaded):
    """LLM logits, visual-head logits and reconstructions on a fixed multimodal input."""
    m, b = loaded.model, Batcher(loaded.cfg, loaded.text, train=False)
    px = smooth_images(2, 16, 32, seed=9)
    seqs = [b.caption_sequence(c)[0] for c in ("red fox", "blue sun")]
    ids = torch.tensor([s[:min(map(len, seqs))] for s in seqs])
    q = m.tokenizer.encode(px)
    embeds = m.embed_inputs(ids, m.visual_tokens(q.z_q, q.indices))
    hidden = m.llm_hidden(embeds, torch.ones_like(ids))
    return {"embeds": embeds, "logits": m.llm.get_output_embeddings()(hidden).float(),
            "visual": m.visual_head(hidden).float(), "recon": m.tokenizer(px)[0]}


def test_export_round_trip(t2i_step, tmp_path, spm):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "export"
    assert export.main(["--ckpt", str(t2i_step), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"llm", "spm.model", "tokenizer.safetensors", "tokenizer_config.json", "projector.safetensors",
            "visual_head.safetensors", "ett_config.yaml"} <= names
    spm.rename(spm.with_suffix(".moved"))  # the export must not need the original text tokenizer
    try:
        after = load_model(out)
    finally:
        spm.with_suffix(".moved").rename(spm)
    before = load_model(t2i_step)
    assert after.kind == "export" and before.kind == "checkpoint"
    assert after.text.encode("red fox") == before.text.encode("red fox")
    a, b = outputs(before), outputs(after)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # Plain transformers opens the LLM and computes the same logits from the same input embeddings.
    with no_zero_init():  # this process built ZeRO-3 trainers; a plain from_pretrained must not partition
        hf = AutoModelForCausalLM.from_pretrained(str(out / "llm")).eval()
    assert hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()  # re-tied
    with torch.no_grad():
        hf_logits = hf(inputs_embeds=a["embeds"]).logits.float()
    torch.testing.assert_close(hf_logits, a["logits"], rtol=1e-5, atol=1e-5)
    # The tokenizer file is plain IBQ: its config in SEED-Voken naming, weights loadable by IBQ-layout code.
    tcfg = tokenizer_config_from_yaml(out / "tokenizer_config.json", before.cfg.model.tokenizer)
    assert tcfg == before.cfg.model.tokenizer
    tok = VisionTokenizer(tcfg)
    load_tokenizer_weights(tok, out / "tokenizer.safetensors")
    for k, v in tok.state_dict().items():
        assert torch.equal(v, before.model.tokenizer.state_dict()[k]), k
    from safetensors import safe_open
    with safe_open(str(out / "tokenizer.safetensors"), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding"))
                   for k in f.keys())
    assert json.loads(meta["ibq_config"])["n_embed"] == tcfg.codebook_size


def test_bfloat16_export_within_tolerance(t2i_step, tmp_path):
    out = tmp_path / "bf16"
    assert export.main(["--ckpt", str(t2i_step), "--out", str(out), "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open
    with safe_open(str(out / "llm" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    a, b = outputs(load_model(t2i_step)), outputs(load_model(out))
    torch.testing.assert_close(b["recon"], a["recon"], rtol=0, atol=1e-6)  # the tokenizer stays float32
    for key in ("logits", "visual"):
        torch.testing.assert_close(b[key], a[key], rtol=0.05, atol=0.05, msg=key)


def test_tokenizer_stage_exports_only_the_tokenizer(spm, tmp_path, capsys):
    tr, step = trained_checkpoint(spm, tmp_path / "run", "tokenizer", 2, "train.ema_decay=0.5")
    out = tmp_path / "tok"
    assert export.main(["--ckpt", str(step.parents[1]), "--out", str(out)]) == 0  # a run folder works too
    assert {p.name for p in out.iterdir()} == {"tokenizer.safetensors", "tokenizer_config.json", "ett_config.yaml"}
    loaded = load_model(out)
    assert loaded.model.llm is None and loaded.text is None
    with tr.ema.swapped():  # the exported weights are the EMA ones
        ema = {k: v.clone() for k, v in _full(tr.model.tokenizer).items()}
    for k, v in loaded.model.tokenizer.state_dict().items():
        assert torch.equal(v, ema[k]), k
    capsys.readouterr()
    assert export.main(["--ckpt", str(out), "--out", str(tmp_path / "again")]) == 2  # an export is not a checkpoint
    assert export.main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert export.main(["--ckpt", str(step), "--out", str(out)]) == 2  # not an empty folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert not (tmp_path / "x").exists()


def _full(module):
    from ett_ds.models.weights import full_state_dict
    return full_state_dict(module)


def test_loading_errors(tmp_path, t2i_step):
    from ett_ds.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="text tokenizer"):
        load_model(t2i_step, text_tokenizer=tmp_path / "gone.model")

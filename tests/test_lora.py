"""LoRA on the LLM (model.llm.lora, peft) under the real ZeRO-3 engine on CPU: only the adapters (and the stage's
other parts) train, checkpoints hold them, init_from crosses the LoRA boundary, and the export merges them into a
plain LLM that captions as the unmerged model does (issue 22, item 5)."""
import copy

import pytest
import torch

from ett_ds.engine import dist
from ett_ds.models import lora
from tests.tiny import SHRINK, repeat, tiny_config, train_spm

R, ALPHA = 4, 8.0
PRE_STEPS, STEPS = 15, 40
# the tests' tiny Qwen2 (tests/tiny.py SHRINK): hidden 64, MLP 128, 4 heads, 2 KV heads, 2 layers
HIDDEN, MLP, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
assert f"model.llm.init_config.hidden_size={HIDDEN}" in SHRINK and f"model.llm.init_config.num_hidden_layers={LAYERS}" \
    in SHRINK and f"model.llm.init_config.intermediate_size={MLP}" in SHRINK


def expected_adapter_params(r: int) -> int:
    """r x (in + out) per targeted nn.Linear, from the shapes of Qwen2's projections."""
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, kv), "v_proj": (HIDDEN, kv), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}
    return LAYERS * sum(r * (i + o) for i, o in shapes.values())


def expected_projector_params(code_dim: int = 32) -> int:
    return (code_dim * HIDDEN + HIDDEN) + (HIDDEN * HIDDEN + HIDDEN)  # Linear(code_dim, h), GELU, Linear(h, h)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    dist.init_distributed()
    return train_spm(tmp_path_factory.mktemp("spm"))


def tiny_qwen(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("qwen2", hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=96,
                               tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_merge_and_init_from_state_dicts_match_the_adapted_model(tmp_path):
    """Without DeepSpeed: merge() gives a plain model computing what the adapted one computes, and fit_state_dict
    carries weights across the LoRA boundary in both directions (merging adapters the target cannot hold)."""
    import yaml

    from ett_ds.config import LoRAConfig
    base = tiny_qwen()
    plain_sd = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = lora.inject(copy.deepcopy(base), LoRAConfig(r=R, alpha=ALPHA))
    assert lora.count(adapted, trainable_only=False, adapters_only=True) == expected_adapter_params(R)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)  # peft starts B at 0: give the adapters something to say
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = adapted(ids).logits
        assert not torch.allclose(want, base(ids).logits, atol=1e-4)
    lora_sd = {k: v.clone() for k, v in adapted.state_dict().items()}
    merged = lora.merge(copy.deepcopy(adapted))
    assert not lora.adapter_layers(merged) and set(merged.state_dict()) == set(plain_sd)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)

    # a plain checkpoint into a LoRA model: base weights renamed, the model's own adapters untouched
    shapes = {k: tuple(v.shape) for k, v in lora_sd.items()}
    fitted = lora.fit_state_dict(plain_sd, shapes)
    assert set(fitted) == {k for k in lora_sd if not lora.is_adapter(k)}
    assert torch.equal(fitted["model.layers.0.self_attn.q_proj.base_layer.weight"],
                       plain_sd["model.layers.0.self_attn.q_proj.weight"])
    # a LoRA checkpoint into a plain model: adapters merged with the checkpoint's alpha / r
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"llm": {"lora": {"r": R, "alpha": ALPHA}}}}))
    fitted = lora.fit_state_dict(lora_sd, {k: tuple(v.shape) for k, v in plain_sd.items()}, tmp_path)
    assert set(fitted) == set(plain_sd)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(fitted[k], v, rtol=0, atol=1e-6, msg=k)
    # the same LoRA shapes: kept as they are
    assert lora.fit_state_dict(lora_sd, shapes, tmp_path).keys() == lora_sd.keys()


def test_lora_refuses_embeddings_and_unknown_targets():
    from ett_ds.config import LoRAConfig
    for bad, msg in ((["lm_head"], "LM head"), (["qkv"], "no module named 'qkv'")):
        with pytest.raises(ValueError, match=msg):
            lora.inject(tiny_qwen(), LoRAConfig(r=R, target_modules=bad))


def chat_batch(tr, captions, images):
    from ett_ds.data.batch import Batcher
    b = Batcher(tr.cfg, tr.text, train=False)
    prompt = tr.cfg.data.caption_prompts[0]
    examples = []
    for px, c in zip(images, captions):
        ids, labels = b.chat_sequence([{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": c}])
        examples.append({"pixels": px, "text": c, "gen": False, "input_ids": ids, "labels": labels})
    return b.collate(examples)


@torch.no_grad()
def caption_logits(model, text, images):
    """The LLM's logits over the sft caption prompt (chat layout) after each image."""
    from ett_ds.generation import chat_prompt, first_user_turn
    ids = torch.tensor([chat_prompt(model, text, [first_user_turn(model.cfg.data.caption_prompts[0])])]
                       * len(images))
    q = model.tokenizer.encode(images, losses=False)
    hidden = model.llm_hidden(model.embed_inputs(ids, model.visual_tokens(q.z_q, q.indices)), torch.ones_like(ids))
    return model.llm.get_output_embeddings()(hidden)


@pytest.mark.slow
def test_lora_sft_trains_only_adapters_and_the_merged_export_captions_alike(spm_model, tmp_path, capsys):
    from ett_ds import export
    from ett_ds.engine.deepspeed import param_groups
    from ett_ds.generation import caption
    from ett_ds.models.loading import load_model
    from ett_ds.models.weights import consolidated_state_dict, full_state_dict
    from ett_ds.trainer import Trainer
    from tests.stage_batches import smooth_images
    captions = ["red fox", "blue sun", "a cat", "green tree"]
    pre_losses = []

    # a previous stage without LoRA that trains the whole LLM (a random one's tied embeddings are too small to
    # answer through frozen: logits of |E| ~ 0.02 x 8), saved
    pre = Trainer(tiny_config(spm_model, tmp_path / "a", "stage=frozen", "engine.precision=fp32", "optim.lr=1e-2",
                              "optim.schedule=constant"))
    h, w = pre.cfg.data.image_size
    images = smooth_images(4, h, w, seed=3)
    it = repeat(chat_batch(pre, captions, images))
    for _ in range(PRE_STEPS):
        pre.train_step(it)
        pre_losses.append(float(pre.log.sums["loss_cap"]))
        pre.log._reset()
    pre_step = pre.save()
    pre_sd = consolidated_state_dict(pre_step)

    tr = Trainer(tiny_config(spm_model, tmp_path / "b", "stage=sft", "engine.precision=fp32",
                             f"model.llm.lora.r={R}", f"model.llm.lora.alpha={ALPHA}", "optim.lr=3e-2",
                             "optim.schedule=constant",
                             "optim.projector_lr=1e-2", f"train.init_from={pre_step}"))
    m = tr.model
    # init_from renamed the plain checkpoint's weights into the base layers; the adapters are new
    assert tr.init_report["unexpected"] == [] and all(lora.is_adapter(n) for n in tr.init_report["missing"])
    base0 = full_state_dict(m.llm)
    assert torch.equal(base0["model.layers.1.mlp.down_proj.base_layer.weight"],
                       pre_sd["llm.model.layers.1.mlp.down_proj.weight"])

    # what trains: the adapters and the projector, nothing else, and the optimizer holds exactly those
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if lora.is_adapter(n) or n.startswith("projector.")}
    n_adapters, n_projector = expected_adapter_params(R), expected_projector_params()
    assert lora.count(m.llm, adapters_only=True) == n_adapters == 8192
    assert lora.count(m) == n_adapters + n_projector == 14464
    per_group = {g["ett_name"]: sum(int(p.ds_numel) for p in g["params"]) for g in param_groups(m, tr.cfg)}
    assert per_group["llm/decay"] == n_adapters and "llm/no_decay" not in per_group
    assert per_group["projector/decay"] + per_group["projector/no_decay"] == n_projector
    llm_total = lora.count(m.llm, trainable_only=False)
    with capsys.disabled():
        print(f"\n[lora] trainable {lora.count(m)} = adapters {n_adapters} + projector {n_projector}; "
              f"LLM {llm_total - n_adapters} base parameters frozen; a full sft would train "
              f"{llm_total - n_adapters + n_projector}")

    proj0 = full_state_dict(m.projector)
    losses = []
    for _ in range(STEPS):
        tr.train_step(it)
        losses.append(float(tr.log.sums["loss_cap"]))
        tr.log._reset()
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5]), losses  # 1.75 -> 1.05 (5-step means) measured here
    after = full_state_dict(m.llm)
    frozen = [k for k in base0 if not lora.is_adapter(k)]
    assert frozen and all(torch.equal(after[k], base0[k]) for k in frozen), "a base weight of the LLM moved"
    moved = [k for k in base0 if lora.is_adapter(k) and not torch.equal(after[k], base0[k])]
    assert len(moved) == 2 * 7 * LAYERS, "every adapter matrix should have moved"
    assert not torch.equal(full_state_dict(m.projector)["0.weight"], proj0["0.weight"])

    # the checkpoint holds the adapters; load_model rebuilds them from its config
    step = tr.save()
    sd = consolidated_state_dict(step)
    assert sum(lora.is_adapter(k) for k in sd) == 2 * 7 * LAYERS
    unmerged = load_model(step)
    assert len(lora.adapter_layers(unmerged.model.llm)) == 7 * LAYERS
    for k, v in full_state_dict(unmerged.model.llm).items():
        assert torch.equal(v, after[k]), k

    # a resumed run continues from the same adapters (and their optimizer state), base weights still frozen
    again = Trainer(tr.cfg)
    again.resume()
    assert again.step == tr.step and lora.count(again.model) == n_adapters + n_projector
    for k, v in full_state_dict(again.model.llm).items():
        assert torch.equal(v, after[k]), k
    again.train_step(it)
    resumed = full_state_dict(again.model.llm)
    assert all(torch.equal(resumed[k], base0[k]) for k in frozen)
    assert not torch.equal(resumed[moved[0]], after[moved[0]])

    # the export merges: a plain LLM, which captions (greedy) as the unmerged model does
    out = export.export(step, tmp_path / "export")
    merged = load_model(out)
    assert merged.cfg.model.llm.lora.r == 0 and not lora.adapter_layers(merged.model.llm)
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.model.named_parameters())
    from safetensors import safe_open
    with safe_open(str(out / "llm" / "model.safetensors"), "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
    heldout = smooth_images(6, h, w, seed=11)
    pics = torch.cat([images, heldout])
    cap_unmerged = caption(unmerged.model, unmerged.text, pics, max_new_tokens=8)
    cap_merged = caption(merged.model, merged.text, pics, max_new_tokens=8)
    lu, lm = caption_logits(unmerged.model, unmerged.text, pics), caption_logits(merged.model, merged.text, pics)
    diff = float((lu - lm).abs().max())
    # the adapters matter: the same model without them answers otherwise
    no_adapters = copy.deepcopy(unmerged.model)
    with torch.no_grad():
        for n, p in no_adapters.named_parameters():
            if ".lora_B." in n:
                p.zero_()
    lb = caption_logits(no_adapters, unmerged.text, pics)
    with capsys.disabled():
        print(f"[lora] loss_cap {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} LoRA steps; captions unmerged {cap_unmerged}; "
              f"merged export {cap_merged}; max |logit difference| {diff:.2e} (without adapters: "
              f"{float((lu - lb).abs().max()):.2f})")
    assert cap_merged == cap_unmerged
    assert len(set(cap_unmerged)) >= 3, "the captions should depend on the image"
    assert diff < 1e-4
    assert float((lu - lb).abs().max()) > 1.0


@pytest.mark.slow
def test_two_rank_lora_sft_cli_export_and_infer_agree(tmp_path):
    """The command lines: a 2-rank ZeRO-3 sft with LoRA (torch.distributed.run) from a plain checkpoint, then
    `python -m ett_ds.export` and `python -m ett_ds.infer caption` on the checkpoint and on the merged export."""
    import sys
    import tarfile
    from pathlib import Path

    from ett_ds.models.loading import resolve
    from ett_ds.models.weights import consolidated_state_dict
    from ett_ds.trainer import Trainer
    from tests.stage_batches import smooth_images
    from tests.tiny import build_demo, run_group, subprocess_env
    repo = Path(__file__).resolve().parents[1]
    demo = build_demo(tmp_path / "demo", 64, 8, 32)
    spm = demo / "spm.model"
    # a plain checkpoint (stage frozen: the whole LLM trains) that has seen number captions in the chat layout
    pre = Trainer(tiny_config(spm, tmp_path / "a", "stage=frozen", "engine.precision=fp32", "optim.lr=1e-2",
                              "optim.schedule=constant"))
    h, w = pre.cfg.data.image_size
    it = repeat(chat_batch(pre, ["417", "952", "368", "120"], smooth_images(4, h, w, seed=5)))
    for _ in range(10):
        pre.train_step(it)
    plain = pre.save()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ett_ds.train", "--config", "tiny", f"out_dir={tmp_path}", "name=lora", "stage=sft",
           f"data.train={demo}/train", f"model.llm.text_tokenizer={spm}", *SHRINK, "data.num_workers=0",
           "data.shuffle_buffer=8", "train.max_steps=12", "train.image_every=0", "train.log_every=1",
           "train.save_every=1000", "engine.precision=fp32", f"model.llm.lora.r={R}", "optim.lr=3e-2",
           f"train.init_from={plain}"]
    rc, out, err = run_group(cmd, 500, cwd=repo, env=subprocess_env())
    assert rc == 0, (out + err)[-3000:]
    _, step = resolve(tmp_path / "lora")
    before, after = consolidated_state_dict(plain), consolidated_state_dict(step)
    adapters = [k for k in after if lora.is_adapter(k)]
    assert len(adapters) == 2 * 7 * LAYERS
    assert any(float(after[k].abs().max()) > 0 for k in adapters if ".lora_B." in k), "the adapters never moved"
    for k, v in after.items():
        if k.startswith("llm.") and not lora.is_adapter(k):
            assert torch.equal(v, before[k.replace(".base_layer.", ".")]), k  # frozen on both ranks

    export_dir = tmp_path / "export"
    rc, out, err = run_group([sys.executable, "-m", "ett_ds.export", "--ckpt", str(step), "--out", str(export_dir)],
                             300, cwd=repo, env=subprocess_env())
    assert rc == 0, (out + err)[-3000:]
    images = []
    with tarfile.open(next(iter(sorted((demo / "heldout").glob("*.tar"))))) as tar:
        for member in tar.getmembers():
            if member.name.endswith((".png", ".jpg")) and len(images) < 6:
                images.append(tmp_path / Path(member.name).name)
                images[-1].write_bytes(tar.extractfile(member).read())
    captions = {}
    for name, ckpt in (("unmerged", step), ("merged", export_dir)):
        rc, out, err = run_group([sys.executable, "-m", "ett_ds.infer", "caption", "--ckpt", str(ckpt), "--device",
                                  "cpu", "--max-new-tokens", "8", "--image", *map(str, images)], 300, cwd=repo,
                                 env=subprocess_env())
        assert rc == 0, (out + err)[-3000:]
        captions[name] = out.splitlines()
    assert len(captions["unmerged"]) == len(images) and captions["merged"] == captions["unmerged"]
    # the same prompt's logits in process (a few steps' captions can be empty: an early eos says little)
    from ett_ds.infer import read_images
    from ett_ds.models.loading import load_model
    unmerged, merged = load_model(step), load_model(export_dir)
    assert not lora.adapter_layers(merged.model.llm)
    pics = read_images(list(map(str, images)), tuple(unmerged.cfg.data.image_size))
    lu, lm = caption_logits(unmerged.model, unmerged.text, pics), caption_logits(merged.model, merged.text, pics)
    diff = float((lu - lm).abs().max())
    print(f"\n[lora] 2-rank sft, infer caption on {len(images)} held-out demo images: {captions}; "
          f"max |logit difference| {diff:.2e}")
    assert diff < 1e-4

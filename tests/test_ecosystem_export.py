"""Issue #14 item 1: the export's llm/ folder opens with AutoModelForCausalLM + a transformers tokenizer + GenerationConfig and
generates what ``python -m ett_ds.infer caption`` prints.

The run uses a sentencepiece text tokenizer on a Qwen2-architecture LLM: transformers 5 ``AutoTokenizer`` forces its
own byte-level ``Qwen2Tokenizer`` for ``model_type: qwen2``, so the exported ``tokenizer.json`` is opened with
``PreTrainedTokenizerFast`` (the class named in its ``tokenizer_config.json``).

The exported LLM is the language model alone: it cannot read pixels. The image part of the caption prompt (image
start, N image-token placeholders, image end) is replaced, as in ett_ds, by the vision tokenizer's visual embeddings;
the test takes those embeddings from ett_ds and builds everything else (prompt ids, generation, stopping, decoding)
with transformers alone, then compares with the infer CLI's output. A text-only prompt is compared token by token
against ett_ds's own greedy decoding from the same ids.
"""
import os

import pytest
import torch
from PIL import Image

from ett_ds import export, infer
from ett_ds.data.batch import Batcher
from ett_ds.data.text import IMAGE_END, IMAGE_START, IMAGE_TOKEN
from ett_ds.engine import dist
from ett_ds.engine.zero3 import no_zero_init
from ett_ds.generation import _image_tokens, _sample_text, _Stream
from ett_ds.models.loading import load_model
from tests.stage_batches import smooth_images, trained_checkpoint
from tests.tiny import train_spm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    dist.init_distributed()
    spm = train_spm(tmp_path_factory.mktemp("spm"))
    step = trained_checkpoint(spm, tmp_path_factory.mktemp("runs"), "ett", 1)[1]
    out = tmp_path_factory.mktemp("exp") / "export"
    old = os.umask(0o022)
    try:
        assert export.main(["--ckpt", str(step), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    return out


def test_export_files_are_world_readable(exported):
    """Item 6: weights and tokenizer files follow the umask (0644 under 022), not 0600."""
    files = [exported / "tokenizer.safetensors", exported / "projector.safetensors",
             *exported.joinpath("llm").glob("*.safetensors"), exported / "llm" / "tokenizer.json"]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_hf_tokenizer_and_generation_config(exported):
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    ours = load_model(exported).text
    tok = PreTrainedTokenizerFast.from_pretrained(str(exported / "llm"))
    gen = GenerationConfig.from_pretrained(str(exported / "llm"))
    assert len(tok) == ours.vocab_size
    for text in ("Read the text.", "the quick brown fox 123", "caf\u00e9 \u2603\n"):
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert tok(text)["input_ids"] == [ours.bos_id] + ours.encode(text)
    assert tok.convert_tokens_to_ids([IMAGE_START, IMAGE_END, IMAGE_TOKEN]) == [ours.boi_id, ours.eoi_id,
                                                                                ours.image_id]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert gen.eos_token_id == ours.eos_id and gen.do_sample is False
    # The chat template renders training's layout (data.chat_template "{role}: {content}\n", eos after replies).
    rendered = tok.apply_chat_template([{"role": "user", "content": "<image>\nHow many digits?"},
                                        {"role": "assistant", "content": "3"},
                                        {"role": "user", "content": "And the first?"}],
                                       tokenize=False, add_generation_prompt=True)
    n = load_model(exported).cfg.num_image_tokens
    assert rendered == (f"{tok.bos_token}user: {IMAGE_START}{IMAGE_TOKEN * n}{IMAGE_END}\nHow many digits?\n"
                        f"assistant: 3{tok.eos_token}\nuser: And the first?\nassistant: ")


def test_transformers_caption_equals_infer(exported, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
    loaded = load_model(exported)
    h, w = loaded.cfg.data.image_size
    px = smooth_images(1, h, w, seed=3)
    path = tmp_path / "img.png"
    Image.fromarray(((px[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(path)
    capsys.readouterr()
    assert infer.main(["caption", "--ckpt", str(exported), "--image", str(path), "--device", "cpu",
                       "--max-new-tokens", "12"]) == 0
    cli_file, cli_caption = capsys.readouterr().out.rstrip("\n").split("\t")
    assert cli_file == str(path)

    # transformers only: tokenizer, prompt ids, generate with the saved GenerationConfig, decode.
    tok = PreTrainedTokenizerFast.from_pretrained(str(exported / "llm"))
    gen = GenerationConfig.from_pretrained(str(exported / "llm"))
    with no_zero_init():
        hf = AutoModelForCausalLM.from_pretrained(str(exported / "llm")).eval()
    n = loaded.cfg.num_image_tokens
    prompt = loaded.cfg.data.caption_prompts[0] + "\n"
    ids = tok(IMAGE_START + IMAGE_TOKEN * n + IMAGE_END, add_special_tokens=True)["input_ids"] + \
        tok.encode(prompt, add_special_tokens=False)
    assert ids == Batcher(loaded.cfg, loaded.text, train=False).caption_prompt()  # same prompt ids as infer
    ids = torch.tensor([ids])
    with torch.no_grad():
        from ett_ds.data.transforms import image_to_tensor
        pixels = image_to_tensor(Image.open(path), size=(h, w), train=False, mode=loaded.cfg.data.resize_mode)[None]
        visual = _image_tokens(loaded.model, pixels)  # the only ett_ds piece: pixels -> visual embeddings
        embeds = hf.get_input_embeddings()(ids).masked_scatter((ids == tok.convert_tokens_to_ids(IMAGE_TOKEN))
                                                               .unsqueeze(-1), visual)
        new = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), generation_config=gen,
                          max_new_tokens=12)[0].tolist()
    assert new, "generate produced nothing"
    hf_caption = tok.decode(new, skip_special_tokens=True).strip()
    assert hf_caption == cli_caption
    assert hf_caption  # a non-empty caption, so the comparison says something


def test_text_only_generate_equals_ett(exported):
    """Same prompt ids, no image: transformers' generate and ett_ds's greedy decoding give the same tokens."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    loaded = load_model(exported)
    tok = PreTrainedTokenizerFast.from_pretrained(str(exported / "llm"))
    with no_zero_init():
        hf = AutoModelForCausalLM.from_pretrained(str(exported / "llm")).eval()
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, max_new_tokens=10)[0, ids.shape[1]:].tolist()
        loaded.model.eval()
        embeds = loaded.model.llm.get_input_embeddings()(ids)
        ours = _sample_text(loaded.model, loaded.text, _Stream(loaded.model, embeds), 10, 0.0, 0, 1.0, None)[0]
    ours = ours[0].tolist()
    eos = loaded.text.eos_id
    ours = ours[: ours.index(eos) + 1] if eos in ours else ours
    assert theirs == ours

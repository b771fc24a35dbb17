"""A local Hugging Face folder (model + tokenizer) loads under ZeRO-3 partitioning; vocab resize is exact."""
import pytest
import torch

from ett_ds.data.text import SPECIALS, TextTokenizer
from ett_ds.engine import dist
from ett_ds.models.weights import full_state_dict
from ett_ds.trainer import Trainer
from tests.tiny import WORDS, tiny_config, train_spm


def make_hf_folder(folder):
    """A tiny Qwen2 saved with save_pretrained, and a real byte-level BPE tokenizer (trained here) beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    vocab = fast.get_vocab()
    torch.manual_seed(3)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(vocab), tie_word_embeddings=True,
                      max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder)
    return model


def test_hf_folder_loads_partitioned_with_exact_weights_and_resized_vocab(tmp_path):
    dist.init_distributed()
    original = make_hf_folder(tmp_path / "qwen")
    text = TextTokenizer(tmp_path / "qwen")
    assert text.kind == "hf" and text.vocab_size == original.config.vocab_size + len(SPECIALS)
    assert text.decode(text.encode("red fox")) == "red fox"
    cfg = tiny_config(train_spm(tmp_path / "spm"), tmp_path, "stage=align", f"model.llm.path={tmp_path / 'qwen'}",
                      "model.llm.init_config=null", "model.llm.text_tokenizer=null")
    tr = Trainer(cfg)
    emb = tr.model.llm.get_input_embeddings().weight
    assert hasattr(emb, "ds_id") and emb.numel() == 0  # built inside zero.Init: partitioned
    full = full_state_dict(tr.model.llm)
    rows = full["model.embed_tokens.weight"]
    old = original.config.vocab_size
    assert rows.shape[0] % 64 == 0 and rows.shape[0] >= text.vocab_size
    torch.testing.assert_close(rows[:old], original.model.embed_tokens.weight.detach())
    torch.testing.assert_close(rows[old:], original.model.embed_tokens.weight.detach().mean(0).expand(
        rows.shape[0] - old, -1))
    torch.testing.assert_close(full["model.layers.1.mlp.down_proj.weight"],
                               original.model.layers[1].mlp.down_proj.weight.detach())


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from ett_ds.config import LLMConfig
    from ett_ds.models.llm import build_llm
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_llm(LLMConfig(path=str(tmp_path)))


def test_hf_model_exports_with_its_tokenizer_and_reopens_in_transformers(tmp_path):
    """A run on a local HF folder exports llm/ that AutoModelForCausalLM and AutoTokenizer open, with the image
    special tokens, and the same logits as the ett_ds model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ett_ds import export
    from ett_ds.engine.zero3 import no_zero_init
    from ett_ds.models.loading import load_model
    from tests.stage_batches import trained_checkpoint
    dist.init_distributed()
    make_hf_folder(tmp_path / "qwen")
    _, step = trained_checkpoint(train_spm(tmp_path / "spm"), tmp_path / "runs", "frozen", 1,
                                 f"model.llm.path={tmp_path / 'qwen'}", "model.llm.init_config=null",
                                 "model.llm.text_tokenizer=null")
    out = tmp_path / "export"
    assert export.main(["--ckpt", str(step), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out / "llm")
    ours = load_model(out)
    assert ours.text.kind == "hf"
    assert ours.text.encode("red fox") and tok.encode("red fox", add_special_tokens=False) == ours.text.encode("red fox")
    assert tok.convert_tokens_to_ids(SPECIALS[2]) == ours.text.image_id
    with no_zero_init():  # this process still holds the trainer's ZeRO-3 config
        hf = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    ids = torch.tensor([ours.text.encode("red fox blue sun")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model.llm(ids).logits, rtol=0, atol=1e-5)

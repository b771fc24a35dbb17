"""A local Hugging Face folder (model + tokenizer) loads under ZeRO-3 partitioning; vocab resize is exact."""
import pytest
import torch

from ett_ds.engine import dist
from ett_ds.models.text import SPECIALS, TextTokenizer
from ett_ds.train import Trainer
from ett_ds.weights import full_state_dict
from tests.tiny import WORDS, tiny_config, train_spm


def make_hf_folder(folder):
    """A tiny Qwen2 saved with save_pretrained, and a real word-level fast tokenizer saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(sorted(set(WORDS)))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder / "tokenizer")  # own folder: transformers 5 picks Qwen2Tokenizer beside a qwen2 config
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
    text = TextTokenizer(tmp_path / "qwen" / "tokenizer")
    assert text.kind == "hf" and text.vocab_size == original.config.vocab_size + len(SPECIALS)
    assert text.decode(text.encode("red fox")) == "red fox"
    cfg = tiny_config(train_spm(tmp_path / "spm"), tmp_path, "stage=align", f"model.llm.path={tmp_path / 'qwen'}",
                      "model.llm.init_config=null", f"model.llm.text_tokenizer={tmp_path / 'qwen' / 'tokenizer'}")
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
    from ett_ds.models.llm import build_llm
    from ett_ds.config import LLMConfig
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_llm(LLMConfig(path=str(tmp_path)))

"""Building the causal LM: from a local folder or from a config dict, partitioned at creation under ZeRO-3.

When an ``HfDeepSpeedConfig`` for a ZeRO-3 config is alive (engine/deepspeed.py keeps one), transformers builds the
model inside ``deepspeed.zero.Init``: each rank only ever holds its shard. Embedding resizing then happens once, to
a multiple of 64, and the new rows are initialised by id under a gather (modifier rank 0). With
``model.llm.lora.r > 0`` the model gets peft's LoRA layers (``models/lora.py``) before it is returned.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import LLMConfig
from ..engine.zero3 import gathered
from . import lora


def build_llm(cfg: LLMConfig) -> nn.Module:
    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.llm.path: no config.json in {path} (a local HF model folder is needed)")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
            dtype=torch.float32)
    else:
        kwargs = dict(cfg.init_config)
        model_type = kwargs.pop("model_type", None)
        if not model_type:
            raise ValueError("model.llm.init_config needs a model_type (e.g. qwen2)")
        hf_cfg = AutoConfig.for_model(model_type, **kwargs)
        hf_cfg._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        # transformers 5's name (gradient_checkpointing_enable is a deprecated alias); non-reentrant checkpointing
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora_cfg = getattr(cfg, "lora", None)
    if lora_cfg is not None and lora_cfg.r > 0:
        lora.inject(model, lora_cfg)  # peft's LoRA layers, in place: partitioned with the rest at deepspeed.initialize
    return model


def base_model(llm: nn.Module) -> nn.Module:
    """The transformer body (hidden states out), e.g. ``Qwen2ForCausalLM.model``."""
    return getattr(llm, llm.base_model_prefix)


def hidden_size(llm: nn.Module) -> int:
    return int(llm.config.hidden_size)


def resize_for_vocab(llm: nn.Module, vocab_size: int, multiple: int = 64) -> int:
    """Grow the embeddings (and untied head) to cover ``vocab_size``, rounded up to ``multiple``; init new rows.

    Rows whose id was not in the old table get the mean of the old rows (computed under a ZeRO-3 gather). Returns
    the new table size. Does nothing when the table is already large enough (e.g. Qwen's padded vocab).
    """
    emb = llm.get_input_embeddings()
    old = _num_rows(emb)
    if vocab_size <= old:
        return old
    new = ((vocab_size + multiple - 1) // multiple) * multiple
    llm.resize_token_embeddings(new, mean_resizing=False)
    tables = [llm.get_input_embeddings()]
    head = llm.get_output_embeddings()
    if head is not None and head.weight is not tables[0].weight:
        tables.append(head)
    for table in tables:
        with gathered([table.weight], modify=True):
            w = table.weight.data
            w[old:] = w[:old].mean(0, keepdim=True)
    return new


def _num_rows(emb: nn.Embedding) -> int:
    return int(getattr(emb.weight, "ds_shape", emb.weight.shape)[0])

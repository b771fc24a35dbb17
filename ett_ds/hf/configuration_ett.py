"""ETTConfig: the exported ETT model's configuration (model_type ``ett``), for transformers' remote code.

``text_config`` is the LLM's own config (any model_type transformers knows; Qwen2 for ett_ds's recipes),
``vision_config`` the vision tokenizer's architecture in taming / SEED-Voken naming (see vision_ett.py), and the
rest says how the two meet: the projector depth, whether codes enter through the projector (``embed``) or an
index embedding (``index``), whether a visual head exists (text-to-image), and the special token ids.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec  # transformers 5: configs are dataclasses


class ETTConfig(PretrainedConfig):
    model_type = "ett"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | None = None
    projector_depth: int = 2
    visual_input: str = "embed"
    has_visual_head: bool = False
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    text_vocab_size: int | None = None
    image_size: list | None = None
    stage: str = "ett"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config is not None and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def get_text_config(self, *args, **kwargs):
        return self.text_config

"""The one model builder: the text tokenizer and the ETTModel of a config, for training and for loading.

``Trainer`` builds with ``zero_init=True``: under a ZeRO-3 config (registered by ``engine/deepspeed.enable_zero_init``)
the LLM is created inside ``deepspeed.zero.Init``, each rank holding only its shard. ``models/loading.load_model``
(inference, export, evaluation) builds with ``zero_init=False``: a plain module, even in a process where a trainer
registered ZeRO-3. LoRA layers are injected by the LLM's own build (``models/llm.build_llm``) when
``model.llm.lora.r > 0``. ``model.tokenizer.checkpoint`` (the tokenizer's initial weights, taming / SEED-Voken or
safetensors) is read when set: training sets it; a saved run's config has it cleared, its weights come from the
checkpoint (``models/loading.read_config``). ``train.init_from`` is not read here: the Trainer fills the built
model from it (``models/weights.load_into_model``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import Config
from ..data.text import TextTokenizer
from ..engine.zero3 import no_zero_init
from ..stages import STAGE_SPECS
from ..tokenizers.checkpoint import load_tokenizer_weights
from .ett import ETTModel


def build_model(cfg: Config, text_tokenizer: str | Path | None = None, *,
                zero_init: bool) -> tuple[ETTModel, TextTokenizer | None]:
    """(model, text tokenizer) of ``cfg``; the text tokenizer is None for a stage without an LLM.

    ``text_tokenizer`` overrides ``model.llm.text_tokenizer`` (else ``model.llm.path``). ``zero_init``: build under
    the ZeRO-3 config this process registered (training), or unpartitioned whatever was registered (loading).
    """
    text = None
    if STAGE_SPECS[cfg.stage].uses_llm:
        text = TextTokenizer(text_tokenizer or cfg.model.llm.text_tokenizer or cfg.model.llm.path,
                             cfg.model.llm.trust_remote_code)
    with contextlib.nullcontext() if zero_init else no_zero_init():
        model = ETTModel(cfg, text.vocab_size if text else None, text.image_id if text else None)
    if cfg.model.tokenizer.checkpoint:
        load_tokenizer_weights(model.tokenizer, cfg.model.tokenizer.checkpoint, cfg.model.tokenizer.use_ema_weights)
    return model, text

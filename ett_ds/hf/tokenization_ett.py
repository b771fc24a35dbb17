"""The text tokenizer of an ETT export, as ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`` opens it.

``text_tokenizer.json`` in the folder says which kind the run trained with:

- ``sentencepiece``: :class:`ETTSentencePieceTokenizer` wraps the run's own ``spm.model`` (sentencepiece itself
  encodes, so the ids are training's exactly), with the three image tokens appended at training's ids (the model's
  piece count, +1, +2). ``tok(text)`` prepends bos when the model has one; ``add_special_tokens=False`` gives
  exactly the ids training's ``TextTokenizer.encode`` gave.
- ``hf``: the LLM's own tokenizer, saved with the image tokens in ``llm/`` (``AutoTokenizer`` on that folder).

Without this class transformers 5 would pick its byte-level ``Qwen2Tokenizer`` for a sentencepiece run on a
Qwen2-architecture LLM and encode differently from training.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken
from transformers.utils import cached_file

SETTINGS = "text_tokenizer.json"
IMAGE_START, IMAGE_END, IMAGE_TOKEN = "<|ett_image_start|>", "<|ett_image_end|>", "<|ett_image|>"


def resolve_file(folder, name: str, **kwargs) -> str | None:
    """A file of a local folder or a Hub repo (through transformers' cache); None when it does not exist."""
    local = Path(str(folder)) / name
    if local.is_file():
        return str(local)
    if Path(str(folder)).is_dir():
        return None
    keep = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "force_download")
            if k in kwargs}
    return cached_file(str(folder), name, _raise_exceptions_for_missing_entries=False, **keep)


class ETTSentencePieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "spm.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, chat_template: str | None = None, **kwargs):
        self.vocab_file = str(vocab_file)
        self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)
        sp = self.sp_model
        base = sp.get_piece_size()
        self.image_start_id, self.image_end_id, self.image_token_id = base, base + 1, base + 2
        named = {"eos_token": sp.id_to_piece(sp.eos_id())}
        named["pad_token"] = sp.id_to_piece(sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id())
        if sp.bos_id() >= 0:
            named["bos_token"] = sp.id_to_piece(sp.bos_id())
        if sp.unk_id() >= 0:
            named["unk_token"] = sp.id_to_piece(sp.unk_id())
        for key, value in named.items():
            kwargs.setdefault(key, value)
        # the image tokens at training's ids, whatever order the base class would add special tokens in
        self._added_tokens_decoder = {base + i: AddedToken(t, special=True, normalized=False)
                                      for i, t in enumerate((IMAGE_START, IMAGE_END, IMAGE_TOKEN))}
        kwargs.setdefault("extra_special_tokens", [IMAGE_START, IMAGE_END, IMAGE_TOKEN])
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(chat_template=chat_template, **kwargs)

    # -- vocabulary ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # pieces of sentencepiece's own ids, so that piece -> id gives those ids back (unknown text -> unk)
        return [self.sp_model.id_to_piece(i) for i in self.sp_model.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index) if 0 <= index < self.vocab_size else self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode([self.sp_model.piece_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        sp, out, run = self.sp_model, [], []
        control = {i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0}
        for i in (int(t) for t in token_ids):
            if 0 <= i < self.vocab_size and not (skip_special_tokens and i in control):
                run.append(i)
                continue
            if run:
                out.append(sp.decode(run))
                run = []
            if not skip_special_tokens and i in self._added_tokens_decoder:
                out.append(self._added_tokens_decoder[i].content)
        if run:
            out.append(sp.decode(run))
        return "".join(out)

    # -- special tokens --------------------------------------------------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.bos_token_id is not None else []
        return bos + list(token_ids_0) + (list(token_ids_1) if token_ids_1 is not None else [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [1 if t in self.all_special_ids else 0 for t in token_ids_0 + (token_ids_1 or [])]
        bos = [1] if self.bos_token_id is not None else []
        return bos + [0] * len(token_ids_0) + ([0] * len(token_ids_1) if token_ids_1 is not None else [])

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 1 if self.bos_token_id is not None else 0

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "spm.model"
        target = os.path.join(save_directory, name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


class ETTTokenizer:
    """What ``auto_map.AutoTokenizer`` names: ``from_pretrained`` returns the right tokenizer for the export (see
    the module docstring); an ETT export's own ``tokenizer_config.json`` is the vision tokenizer's layout, so the
    text tokenizer is never read from it."""

    @classmethod
    def from_pretrained(cls, folder, *args, **kwargs):
        settings = json.loads(Path(resolve_file(folder, SETTINGS, **kwargs)).read_text())
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("_from_auto", None)
        kwargs.pop("_commit_hash", None)
        if settings["kind"] == "sentencepiece":
            model_file = resolve_file(folder, settings["model_file"], **kwargs)
            return ETTSentencePieceTokenizer(model_file, chat_template=settings.get("chat_template"))
        sub = settings.get("folder", "llm")
        if Path(str(folder)).is_dir():
            return AutoTokenizer.from_pretrained(str(Path(str(folder)) / sub))
        return AutoTokenizer.from_pretrained(str(folder), subfolder=sub, **kwargs)

    register_for_auto_class = classmethod(lambda cls, *a, **k: None)

"""One interface over the two kinds of text tokenizer: a local Hugging Face folder or a sentencepiece .model.

Three special tokens are added for images: image start, image end and the image placeholder whose positions the
visual embeddings replace. Objects are picklable (they travel into DataLoader workers).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import sentencepiece as spm
from tokenizers.processors import TemplateProcessing

IGNORE = -100  # the target id no loss reads (prompt, padding, image positions)
IMAGE_START, IMAGE_END, IMAGE_TOKEN = "<|ett_image_start|>", "<|ett_image_end|>", "<|ett_image|>"
SPECIALS = (IMAGE_START, IMAGE_END, IMAGE_TOKEN)
# Strings the export checks the HF tokenizer on: digits, punctuation, spacing, newlines, non-ASCII (byte fallback).
PROBES = ("Read the text.", "What is the first digit?", "How many digits?", "123 4567", "  two  spaces ",
          "user: hi\n", "a\nb\n\n", "caf\u00e9 \u2603 \u4e2d", "", "Describe the image.\n")


MISSING_HINT = ("model.llm.text_tokenizer: a sentencepiece .model or a local Hugging Face tokenizer folder; left unset "
                "with a random-init LLM (model.llm.init_config), training makes one from data.train's captions, "
                "see docs/own_data.md")
RUN_SPM = "spm.model"  # the sentencepiece model a run trained or inherited, in its run folder


class TextTokenizer:
    """encode/decode plus the ids the batch builder needs: bos (may be None), eos, pad, boi, eoi, image."""

    def __init__(self, path: str | Path, trust_remote_code: bool = False):
        self.path = str(path)
        self.trust_remote_code = trust_remote_code
        self._load()

    def _load(self) -> None:
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"text tokenizer not found: {p} ({MISSING_HINT})")
        if p.is_file() and p.suffix == ".model":
            self.kind = "sentencepiece"
            self._sp = spm.SentencePieceProcessor(model_file=str(p))
            base = self._sp.get_piece_size()
            self.boi_id, self.eoi_id, self.image_id = base, base + 1, base + 2
            self.vocab_size = base + len(SPECIALS)
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id()
            if self.eos_id < 0:
                raise ValueError(f"{p}: the sentencepiece model has no eos piece (train it with eos_id set)")
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        else:
            from transformers import AutoTokenizer  # reason: transformers (~0.8 s) only for an HF tokenizer folder
            self.kind = "hf"
            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=self.trust_remote_code)
            tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)},
                                   replace_extra_special_tokens=False) if _accepts_replace(tok) else \
                tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
            self._hf = tok
            self.boi_id, self.eoi_id, self.image_id = (tok.convert_tokens_to_ids(s) for s in SPECIALS)
            self.vocab_size = len(tok)
            self.bos_id = tok.bos_token_id
            self.eos_id = tok.eos_token_id
            if self.eos_id is None:
                raise ValueError(f"{p}: the tokenizer has no eos token")
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) < self.boi_id or self.kind == "hf"]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer next to an exported model (HF folder or spm.model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "sentencepiece":
            (folder / "spm.model").write_bytes(Path(self.path).read_bytes())
        else:
            self._hf.save_pretrained(str(folder))

    def hf_tokenizer(self, chat_template: str | None = None):
        """A ``transformers`` tokenizer that encodes and decodes exactly like this one, image specials included.

        For sentencepiece, a fast tokenizer (``tokenizer.json``) built from the ``.model``'s own proto (pieces,
        scores, normalizer, dummy prefix, byte fallback) with the three image tokens appended at the same ids;
        ``tok(text)`` prepends bos when the model has one, ``add_special_tokens=False`` gives ``encode(text)``.
        ``chat_template`` (a Jinja template, see :func:`chat_template_jinja`) replaces any template it had.
        """
        if self.kind == "hf":
            tok = self._hf
        else:
            tok = _fast_from_sentencepiece(self)
        if chat_template is not None:
            tok.chat_template = chat_template
        return tok

    def check_hf(self, tok, probes=PROBES) -> None:
        """Raise ValueError unless ``tok`` gives this tokenizer's ids (and texts back) on ``probes``."""
        ids = [self.boi_id, self.eoi_id, self.image_id]
        if tok.convert_tokens_to_ids(list(SPECIALS)) != ids:
            raise ValueError(f"HF tokenizer: image specials at {tok.convert_tokens_to_ids(list(SPECIALS))}, "
                             f"expected {ids}")
        if tok.eos_token_id != self.eos_id or tok.bos_token_id != self.bos_id or tok.pad_token_id != self.pad_id:
            raise ValueError("HF tokenizer: bos/eos/pad ids differ from the training tokenizer's")
        for text in probes:
            theirs = tok.encode(text, add_special_tokens=False)
            if theirs != self.encode(text):
                raise ValueError(f"HF tokenizer encodes {text!r} as {theirs}, training used {self.encode(text)}")
            if tok.decode(theirs, skip_special_tokens=True) != self.decode(theirs):
                raise ValueError(f"HF tokenizer decodes {text!r} differently")

    def __getstate__(self):
        return {"path": self.path, "trust_remote_code": self.trust_remote_code}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()


def chat_template_jinja(template: str, num_image_tokens: int) -> str:
    """Training's ``data.chat_template`` (a ``{role}``/``{content}`` format string) as a Jinja chat template.

    It renders the text of the sft layout of :class:`ett_ds.data.batch.Batcher`: bos, then per message the
    template with LLaVA roles mapped (human -> user, gpt -> assistant), eos right after each assistant content,
    ``<image>`` in a message replaced by image start + N image tokens + image end; ``add_generation_prompt``
    appends the opening of an assistant turn. (Training encodes each piece on its own, so the ids of a rendered
    string can differ from training's at piece boundaries; the text is the same.)
    """
    if "{content}" not in template or "{role}" not in template:
        raise ValueError("data.chat_template must contain {role} and {content}")
    pre, post = template.split("{content}", 1)

    def render(part: str, role: str) -> str:
        pieces = part.split("{role}")
        out = []
        for k, piece in enumerate(pieces):
            if k:
                out.append(f"{{{{ {role} }}}}")
            if piece:
                out.append(f"{{{{ {json.dumps(piece)} }}}}")
        return "".join(out)

    image = json.dumps(IMAGE_START + IMAGE_TOKEN * num_image_tokens + IMAGE_END)
    roles = json.dumps({"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                        "system": "system"})
    return ("{% set roles = " + roles + " %}{{ bos_token if bos_token else '' }}"
            "{% for message in messages %}"
            "{% set role = roles.get(message['role'], message['role']) %}"
            + render(pre, "role")
            + "{{ message['content'] | replace('<image>', " + image + ") }}"
            "{% if role == 'assistant' %}{{ eos_token }}{% endif %}"
            + render(post, "role")
            + "{% endfor %}{% if add_generation_prompt %}" + render(pre, "'assistant'") + "{% endif %}")


def _fast_from_sentencepiece(text: TextTokenizer):
    from transformers import PreTrainedTokenizerFast  # reason: transformers' import only where exports need it
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf  # reason: as above
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(text.path).read_bytes())
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, [(p.piece, p.score) for p in proto.pieces])
    if backend is None:
        raise ValueError(f"{text.path}: cannot convert this sentencepiece model to a fast tokenizer")
    piece = text._sp.id_to_piece
    if text.bos_id is not None:
        bos = piece(text.bos_id)
        backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                    special_tokens=[(bos, text.bos_id)])
    named = {"eos_token": piece(text.eos_id), "pad_token": piece(text.pad_id)}
    if text.bos_id is not None:
        named["bos_token"] = piece(text.bos_id)
    if text._sp.unk_id() >= 0:
        named["unk_token"] = piece(text._sp.unk_id())
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **named)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    return tok


def _accepts_replace(tok) -> bool:
    return "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters

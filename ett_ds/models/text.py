"""One interface over the two kinds of text tokenizer: a local Hugging Face folder or a sentencepiece .model.

Three special tokens are added for images: image start, image end and the image placeholder whose positions the
visual embeddings replace. Objects are picklable (they travel into DataLoader workers).
"""
from __future__ import annotations

from pathlib import Path

IMAGE_START, IMAGE_END, IMAGE_TOKEN = "<|ett_image_start|>", "<|ett_image_end|>", "<|ett_image|>"
SPECIALS = (IMAGE_START, IMAGE_END, IMAGE_TOKEN)


class TextTokenizer:
    """encode/decode plus the ids the batch builder needs: bos (may be None), eos, pad, boi, eoi, image."""

    def __init__(self, path: str | Path, trust_remote_code: bool = False):
        self.path = str(path)
        self.trust_remote_code = trust_remote_code
        self._load()

    def _load(self) -> None:
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"text tokenizer not found: {p}")
        if p.is_file() and p.suffix == ".model":
            import sentencepiece as spm
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
            from transformers import AutoTokenizer
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

    def __getstate__(self):
        return {"path": self.path, "trust_remote_code": self.trust_remote_code}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()


def _accepts_replace(tok) -> bool:
    import inspect
    return "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters

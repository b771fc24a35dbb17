"""``data_tools train-spm``: a sentencepiece model from caption text, for the tiny LLM without a pretrained vocab.

Inputs may be shard directories / tar files (the ``txt`` members, else the ``caption`` or ``text`` field of ``json``:
the loader's rule) or plain text files (one sentence per line). Ids are fixed (pad=0, unk=1, bos=2, eos=3) so the
model code can rely on them; ``byte_fallback`` makes every string encodable; ``hard_vocab_limit=False`` lets a small
corpus produce a smaller vocabulary instead of failing.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from ett_ds.data.format import CAPTION_EXT, TEXT_EXTS, json_caption, split_name

from .errors import UsageError


def captions_from_tar(path: Path) -> Iterator[str]:
    """One caption per sample: the ``txt`` member, else the json's caption field. A broken tar ends early, silently."""
    key, txt, meta_caption = None, None, None

    def emit():
        text = txt if txt is not None else meta_caption
        return text.strip() if isinstance(text, str) and text.strip() else None

    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                k, ext = split_name(info.name)
                if ext not in TEXT_EXTS:
                    continue
                if k != key:
                    if (text := emit()) is not None:
                        yield text
                    key, txt, meta_caption = k, None, None
                data = tar.extractfile(info).read()
                if ext == CAPTION_EXT:
                    txt = data.decode("utf-8", "replace")
                else:
                    try:
                        meta = json.loads(data)
                    except ValueError:
                        continue
                    meta_caption = json_caption(meta) if isinstance(meta, dict) else None
    except (tarfile.TarError, OSError):
        pass
    if (text := emit()) is not None:
        yield text


def iter_captions(inputs: Iterable[str]) -> Iterator[str]:
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            tars = sorted(p.glob("*.tar"))
            if not tars:
                raise UsageError(f"no .tar shards in {p}")
            for t in tars:
                yield from captions_from_tar(t)
        elif p.suffix == ".tar" and p.is_file():
            yield from captions_from_tar(p)
        elif p.is_file():
            with open(p, encoding="utf-8", errors="replace") as f:
                yield from (line.strip() for line in f if line.strip())
        else:
            raise UsageError(f"input not found: {p}")


def train_spm(inputs: list[str], out_prefix: str, *, vocab_size: int = 1000, model_type: str = "unigram",
              character_coverage: float = 1.0, max_sentences: int = 2_000_000, seed: int = 0,
              split_digits: bool = False) -> dict:
    """``split_digits``: every digit is its own piece (numbers are read and written digit by digit, so a model
    can produce numbers it never saw whole)."""
    import sentencepiece as spm

    sentences = []
    for s in iter_captions(inputs):
        sentences.append(s)
        if len(sentences) >= max_sentences:
            break
    if not sentences:
        raise UsageError("no caption text found in the inputs")
    minimum = len({c for s in sentences for c in s if not c.isspace()}) + 256 + 4 + 1
    if vocab_size < minimum:
        raise UsageError(f"--vocab-size {vocab_size} is below the minimum {minimum} for this corpus "
                         "(256 byte pieces + 4 specials + its characters)")
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        sentence_iterator=iter(sentences), model_prefix=str(out), vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, byte_fallback=True, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>",
        eos_piece="</s>", input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2, split_digits=split_digits,

    )
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise UsageError(f"sentencepiece training failed: {msg}") from None
    proc = spm.SentencePieceProcessor(model_file=f"{out}.model")
    return {"model": f"{out}.model", "vocab_size": proc.get_piece_size(), "sentences": len(sentences)}

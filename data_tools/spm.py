"""``data_tools train-spm``: a sentencepiece model from caption text, for the tiny LLM without a pretrained vocab.

Inputs may be shard directories / tar files (the ``txt`` members, else the ``caption`` or ``text`` field of ``json``:
the loader's rule) or plain text files (one sentence per line). Ids are fixed (pad=0, unk=1, bos=2, eos=3) so the
model code can rely on them; ``byte_fallback`` makes every string encodable; ``hard_vocab_limit=False`` lets a small
corpus produce a smaller vocabulary instead of failing.

:func:`spm_from_shards` is what training does for a randomly initialised LLM without a tokenizer (the ``own``
recipe): captions read from the training shards with the loader's own reader (any ``data.train`` spec: folders, brace
patterns, ``::`` joins, ``pipe:`` and http(s) URLs), at most ``max_sentences`` of them, and a vocabulary raised to the
corpus's minimum when asked for less.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from ett_ds.data.format import (
    CAPTION_EXT,
    TEXT_EXTS,
    SampleError,
    clean_caption,
    json_caption,
    read_json,
    sample_caption,
    split_name,
)

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
    sentences = []
    for s in iter_captions(inputs):
        sentences.append(s)
        if len(sentences) >= max_sentences:
            break
    return _train(sentences, out_prefix, vocab_size=vocab_size, model_type=model_type,
                  character_coverage=character_coverage, max_sentences=max_sentences, split_digits=split_digits)


def min_vocab_size(sentences: list[str]) -> int:
    """The smallest vocabulary sentencepiece accepts for this corpus: 256 byte pieces + 4 specials + its characters."""
    return len({c for s in sentences for c in s if not c.isspace()}) + 256 + 4 + 1


def captions_from_shards(urls: str, max_sentences: int = 200_000) -> list[str]:
    """Up to ``max_sentences`` captions of the shards ``urls`` names (a ``data.train`` spec), read as training reads
    them (``ett_ds.data.decode.iter_tar_samples``: whitelisted members only, size caps; the ``txt`` member, else
    the json's caption field; the turns of a json's ``conversations``, for sft shards). Samples without a usable
    caption are passed over."""
    from collections import Counter

    from ett_ds.data.decode import iter_tar_samples  # reason: decode and shards import torch, data_tools does not
    from ett_ds.data.shards import expand_urls  # reason: as above

    out: list[str] = []
    stats: Counter = Counter()
    for url in expand_urls(urls):
        for raw in iter_tar_samples(url, stats):
            try:
                text = clean_caption(raw[CAPTION_EXT]) if raw.get(CAPTION_EXT) else None
                meta = read_json(raw["json"]) if raw.get("json") else {}
                texts = [sample_caption(text, meta)] + _turns(meta.get("conversations"))
            except SampleError:
                continue
            for text in texts:
                if isinstance(text, str) and text.strip():
                    out.append(text.strip())
                    if len(out) >= max_sentences:
                        return out
    return out


def _turns(conversations) -> list[str]:
    """The texts of LLaVA-style turns ({from/role, value/content}), without the ``<image>`` mark."""
    if not isinstance(conversations, list):
        return []
    return [str(t.get("value", t.get("content", ""))).replace("<image>", " ").strip()
            for t in conversations if isinstance(t, dict)]


def spm_from_shards(urls: str, out_prefix: str, *, vocab_size: int, max_sentences: int = 200_000) -> dict:
    """A sentencepiece model (``out_prefix.model``) from the captions of training shards: up to ``vocab_size``
    pieces (raised to :func:`min_vocab_size` when the corpus needs more; fewer when a small corpus has fewer)."""
    sentences = captions_from_shards(urls, max_sentences)
    if not sentences:
        raise UsageError(f"no captions found in {urls} to train a sentencepiece model from")
    return _train(sentences, out_prefix, vocab_size=max(vocab_size, min_vocab_size(sentences)),
                  max_sentences=max_sentences)


def _train(sentences: list[str], out_prefix: str, *, vocab_size: int, model_type: str = "unigram",
           character_coverage: float = 1.0, max_sentences: int = 2_000_000, split_digits: bool = False) -> dict:
    import sentencepiece as spm

    if not sentences:
        raise UsageError("no caption text found in the inputs")
    minimum = min_vocab_size(sentences)
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

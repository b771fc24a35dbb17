"""Short-answer VQA: the standard VQA accuracy, its answer normalisation, the data and the greedy answers.

Accuracy (VQA v2's): a question has (usually 10) human answers. For each way of leaving one of them out, the
prediction scores ``min(#remaining answers equal to it / 3, 1)``; the question's accuracy is the mean over those
subsets. With 10 answers: 4 or more matches -> 1.0, 3 -> 0.9, 2 -> 0.6, 1 -> 0.3, 0 -> 0. A question with a single
answer scores 1.0 on a match. Prediction and answers are compared after :func:`normalize_answer`.

Data (``--data`` of ``ett_ds.evaluate --tasks vqa``): a JSONL of ``{"image": PATH relative to the JSONL,
"question": str, "answers": [str, ...]}`` (``"answer": str`` is one answer; ``question_id`` optional), or shards
whose json holds ``question`` and ``answers``. Images go through the training decode checks (skips counted by
reason); a row without a question or answers is ``no_question``.

Prompt: ``--vqa-prompt`` with ``{question}``, asked as the first user turn of a chat (``<image>`` first) for an
``sft`` checkpoint, or written after the image like a caption prompt for the other stages; greedy decoding.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..data.decode import decode_sample, iter_tar_samples
from ..data.format import SampleError
from ..data.shards import expand_urls
from ..data.transforms import image_to_uint8, to_unit_range
from ..generation import caption, chat_prompt, decode_texts, decode_tokens, eval_mode, first_user_turn

DEFAULT_PROMPT = "{question} Answer with a single word or number."

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# common contractions written without their apostrophe -> with it
CONTRACTIONS = {w.replace("'", ""): w for w in (
    "aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't", "isn't", "mightn't",
    "mustn't", "shouldn't", "wasn't", "weren't", "won't", "wouldn't", "i'm", "i've", "i'll", "i'd", "you're",
    "you've", "you'll", "he's", "she's", "it'll", "we're", "we've", "they're", "they've", "they'll", "that's",
    "there's", "what's", "where's", "who's", "let's", "y'all", "ma'am", "o'clock")}
PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$|~:")


def _strip_punctuation(text: str) -> str:
    # a thousands comma inside a number goes ("1,000" -> "1000"); a period that is no decimal point goes
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "", text)
    out = []
    for i, ch in enumerate(text):
        if ch in PUNCTUATION:
            # next to a space or an end it is dropped ("yes!" -> "yes"); between letters it separates ("t-shirt")
            edge = i == 0 or i == len(text) - 1 or text[i - 1] == " " or text[i + 1] == " "
            out.append("" if edge else " ")
        else:
            out.append(ch)
    return "".join(out)


def normalize_answer(text: str) -> str:
    """Lowercase; punctuation removed (see above); number words zero..ten -> digits; articles a/an/the dropped;
    contractions written without an apostrophe get it back; whitespace collapsed."""
    text = " ".join(str(text).replace("\n", " ").replace("\t", " ").lower().split())
    words = []
    for w in _strip_punctuation(text).split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against its human answers (module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy: no answers")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min((total - h) / 3.0, 1.0) for h in hits) / len(hits)


# -- data ----------------------------------------------------------------------------------------------------------
def answers_of(row: dict) -> list[str] | None:
    """The human answers of a row: ``answers`` (a list of strings, or VQA v2's ``[{"answer": ...}]``) or ``answer``
    (one string); None when there are none or one is not a string."""
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if isinstance(answers, list):  # VQA v2 style [{"answer": ...}] too
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return None
    return answers


def has_question(row: dict) -> bool:
    """A non-blank ``question`` string and :func:`answers_of` answers (else the row counts as ``no_question``)."""
    question = row.get("question")
    return isinstance(question, str) and bool(question.strip()) and answers_of(row) is not None


def has_image_path(row) -> bool:
    """A JSONL row is a JSON object with an ``image`` path (else it counts as ``bad_json``)."""
    return isinstance(row, dict) and isinstance(row.get("image"), str)


def valid_row(row) -> bool:
    """A JSONL row :func:`iter_vqa` asks: an image path, a question and answers (its image not yet opened)."""
    return has_image_path(row) and has_question(row)


def _record(meta: dict, key: str, image_ref: str, raw: dict, stats: Counter, decode: dict) -> dict | None:
    if not has_question(meta):
        stats["no_question"] += 1
        return None
    try:
        sample = decode_sample({"__key__": key, **raw}, **decode)
    except SampleError as e:
        stats[e.reason] += 1
        return None
    stats["ok"] += 1
    return {"question_id": meta.get("question_id", key), "image": image_ref, "question": meta["question"].strip(),
            "answers": answers_of(meta), "pil": sample["image"]}


def iter_vqa(data: str, stats: Counter, decode: dict, rank: int = 0, world: int = 1):
    """This rank's share (every world-th question) of a VQA JSONL or of shards, as records with a PIL image."""
    if data.endswith((".jsonl", ".ndjson")):
        path = Path(data)
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip()]
        for i, line in enumerate(lines):
            if i % world != rank:
                continue
            try:
                meta = json.loads(line)
            except ValueError:
                stats["bad_json"] += 1
                continue
            if not has_image_path(meta):
                stats["bad_json"] += 1
                continue
            img = path.parent / meta["image"]
            try:
                raw = {img.suffix.lower().lstrip(".").replace("jpeg", "jpg"): img.read_bytes()}
            except OSError:
                stats["missing_image"] += 1
                continue
            rec = _record(meta, str(meta.get("question_id", i)), meta["image"], raw, stats, decode)
            if rec is not None:
                yield rec
        return
    i = 0
    for url in expand_urls(data):
        for raw in iter_tar_samples(url, stats):
            i += 1
            if (i - 1) % world != rank:
                continue
            try:
                meta = json.loads(raw.get("json") or b"{}")
            except ValueError:
                stats["bad_json"] += 1
                continue
            key = raw.pop("__key__")
            raw.pop("__url__", None)
            rec = _record(meta if isinstance(meta, dict) else {}, key, f"{url}#{key}", raw, stats, decode)
            if rec is not None:
                yield rec


# -- answers -------------------------------------------------------------------------------------------------------
def answer_batch(model, text, pixels, prompt: str, max_new_tokens: int) -> list[str]:
    """Greedy answers for (B, 3, H, W) images in [-1, 1] that share one prompt."""
    if model.cfg.stage != "sft":
        return caption(model, text, pixels, prompt=prompt, max_new_tokens=max_new_tokens)
    device = next(model.tokenizer.parameters()).device
    ids = torch.tensor([chat_prompt(model, text, [first_user_turn(prompt)])] * pixels.shape[0], device=device)
    with eval_mode(model):
        return decode_texts(text, decode_tokens(model, text, ids, pixels.to(device), max_new_tokens))


def answer_all(model, text, items: list[tuple], batch_size: int) -> list[str]:
    """Greedy answers for ``items`` = [(prompt, uint8 pixels (3, H, W), max_new_tokens), ...], in their order: items
    that share (prompt, max_new_tokens) are answered in batches of ``batch_size``, the groups in order of first
    appearance. What ``run_vqa`` and lmms-eval's ``ett`` model (``ett_ds.eval.lmms``) answer with."""
    groups: dict[tuple, list[int]] = {}
    for i, (prompt, _, n) in enumerate(items):
        groups.setdefault((prompt, n), []).append(i)
    out: list[str] = [""] * len(items)
    with torch.no_grad():
        for (prompt, n), idx in groups.items():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                pixels = to_unit_range(torch.stack([items[i][1] for i in chunk]))
                for i, pred in zip(chunk, answer_batch(model, text, pixels, prompt, n)):
                    out[i] = pred
    return out


def run_vqa(model, text, cfg, data: str, template: str, batch_size: int, max_new_tokens: int,
            rank: int = 0, world: int = 1, max_samples: int | None = None) -> tuple[list[dict], Counter]:
    """This rank's per-question records (prediction and accuracy filled in) and the data skip counts. Questions
    that share a prompt are answered in batches of ``batch_size`` (:func:`answer_all`)."""
    if "{question}" not in template:
        raise ValueError("--vqa-prompt must contain {question}")
    stats: Counter = Counter()
    decode = {"decode_size": tuple(cfg.data.image_size), "resize_mode": cfg.data.resize_mode}
    recs, items = [], []
    for rec in iter_vqa(data, stats, decode, rank, world):
        pixels = image_to_uint8(rec.pop("pil"), size=tuple(cfg.data.image_size), mode=cfg.data.resize_mode)
        items.append((template.format(question=rec["question"]), pixels, max_new_tokens))
        recs.append(rec)
        if max_samples and len(recs) >= max_samples:
            break
    for r, (prompt, _, _), pred in zip(recs, items, answer_all(model, text, items, batch_size)):
        r.update(prompt=prompt, prediction=pred, normalized=normalize_answer(pred),
                 accuracy=vqa_accuracy(pred, r["answers"]))
    return recs, stats


def summarize_vqa(recs: list[dict], template: str) -> dict:
    n = len(recs)
    return {"accuracy": sum(r["accuracy"] for r in recs) / n if n else None, "num_questions": n,
            "full_credit": sum(r["accuracy"] == 1.0 for r in recs) / n if n else None, "prompt": template}

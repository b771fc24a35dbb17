"""Language pretraining of the tiny LLM on text alone (a plain PyTorch loop), saved for ``model.llm.path=``.

The LLM is built exactly as stage 1 builds it (``ett_ds.models.llm.build_llm`` from the recipe's
``model.llm.init_config``, then ``resize_for_vocab`` to the sentencepiece vocabulary plus the three image tokens), so
the ids it learns are the ids the arms feed it. Two corpora (``corpus=``):

``captions`` (issue 16): the caption prior alone. Captions in the caption layout without the image,
``[bos] prompt caption [eos]``, and corpus lines ``[bos] line [eos]``. It teaches exactly that the caption does not
depend on anything before it, so a frozen LLM trained on it gives stage 1 nothing to exploit.

``lookback`` (issue 23, the default): text in which the caption is read off earlier tokens, in the caption layout
*with* the image slots, ``[bos] [boi] s_1 .. s_N [eoi] prompt\n caption [eos]``, where the N slots hold ordinary text
tokens (``lookback_slots``):

- ``grid`` (60 %): the slots form the image's ``rows x cols`` token grid; digit k of the caption fills the columns
  around k/n of the width in every row (column boundaries jittered, margins sometimes blank), the other cells hold
  filler tokens, and every cell is corrupted with a per-sequence probability (a wrong digit or filler). The caption
  is the digits read column-block by column-block, a majority over rows: reading a layout back, with noise;
- ``copy`` (25 %): the caption's digits stand in order at random slots among filler: copying a span from earlier in
  the sequence, wherever it is;
- ``prior`` (15 %): filler only; the caption is a training caption: the prior, for when nothing can be read.

Loss on the caption and eos only (as in stage 1). At the slots the input embeddings get Gaussian noise of a
per-sequence scale (up to ``noise`` x the embedding's RMS), so what the LLM reads there need not be an exact token
embedding: the projector of stage 1 emits vectors, not tokens. Digits are the caption strings of the training split
(held-out strings stay unseen). Filler tokens are byte pieces no caption or prompt uses.

``save_pretrained`` writes the folder; ``text_pretrain.json`` beside it records the sentencepiece model's SHA-256,
checked before the folder is used, because a model trained on other ids reads nonsense.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

RECORD = "text_pretrain.json"


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check(folder: Path, spm_path: str | Path) -> None:
    rec = json.loads((folder / RECORD).read_text())
    if rec["plan"]["spm_sha256"] != sha256(spm_path):
        raise SystemExit(f"error: {folder} was pretrained with another sentencepiece model than {spm_path}")


def sequences(text, captions: list[str], corpus: list[str], prompt: str, max_tokens: int) -> list[list[int]]:
    bos = [text.bos_id] if text.bos_id is not None else []
    pre = bos + text.encode(prompt)
    out = [pre + text.encode(c)[:max_tokens] + [text.eos_id] for c in captions]
    out += [bos + text.encode(line)[:max_tokens] + [text.eos_id] for line in corpus]
    return out


KINDS = (("grid", 0.60), ("copy", 0.25), ("prior", 0.15))


class Lookback:
    """Sequences of the ``lookback`` corpus (ids, label start, slot positions) over one tokenizer's ids."""

    def __init__(self, text, captions: list[str], prompt: str, num_slots: int, cols: int, max_tokens: int,
                 fillers: int = 16):
        self.text, self.captions, self.n, self.cols = text, [c for c in captions if c.strip()], num_slots, cols
        self.rows = max(1, num_slots // cols)
        self.max_tokens = max_tokens
        self.digit = {d: text.encode(str(d))[-1] for d in range(10)}
        used = {i for c in self.captions[:2000] for i in text.encode(c)} | set(text.encode(prompt + "\n"))
        specials = {text.bos_id, text.eos_id, text.pad_id, text.boi_id, text.eoi_id, text.image_id}
        pool = [i for i in range(text.boi_id) if i not in used and i not in specials and i > 3]
        self.fillers = pool[len(pool) // 2::max(1, len(pool) // (2 * fillers))][:fillers] or pool[:fillers]
        bos = [text.bos_id] if text.bos_id is not None else []
        self.head = bos + [text.boi_id]
        self.tail = [text.eoi_id] + text.encode(prompt + "\n")

    def slots(self, rng: random.Random, kind: str, digits: list[int]) -> list[int]:
        fill = lambda: rng.choice(self.fillers)  # noqa: E731
        if kind == "prior":
            return [fill() for _ in range(self.n)]
        if kind == "copy":
            out = [fill() for _ in range(self.n)]
            for pos, d in zip(sorted(rng.sample(range(self.n), len(digits))), digits):
                out[pos] = self.digit[d]
            return out
        # grid: column c belongs to the digit whose block covers it; blocks jittered, margins sometimes blank
        cols, k = self.cols, len(digits)
        lo = 1 if rng.random() < 0.25 else 0
        hi = cols - 1 if rng.random() < 0.25 else cols
        width = (hi - lo) / k
        cuts = [lo + width * j + rng.uniform(-0.35, 0.35) * width for j in range(1, k)]
        owner = []
        for c in range(cols):
            if not lo <= c < hi:
                owner.append(None)
                continue
            owner.append(sum(c + 0.5 > cut for cut in cuts))
        keep = rng.uniform(0.55, 1.0)
        out = []
        for _ in range(self.rows):
            for c in range(cols):
                if owner[c] is None:
                    out.append(self.digit[rng.randrange(10)] if rng.random() < 0.05 else fill())
                elif rng.random() < keep:
                    out.append(self.digit[digits[owner[c]]])
                else:
                    out.append(self.digit[rng.randrange(10)] if rng.random() < 0.5 else fill())
        return (out + [fill() for _ in range(self.n)])[: self.n]

    def sample(self, rng: random.Random, kind: str | None = None) -> tuple[list[int], int, str]:
        """(ids, index of the first caption id, kind)."""
        if kind is None:
            kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        cap = rng.choice(self.captions)
        digits = [int(ch) for ch in cap if ch.isdigit()] or [0]
        slots = self.slots(rng, kind, digits)
        if kind != "prior":
            cap = "".join(map(str, digits))
        pre = self.head + slots + self.tail
        return pre + self.text.encode(cap)[: self.max_tokens] + [self.text.eos_id], len(pre), kind


def pretrain(folder: Path, cfg, captions: list[str], corpus: list[str], *, steps: int, batch: int, lr: float,
             seed: int, log_every: int = 50, kind: str = "lookback", noise: float = 0.5) -> dict:
    """Train and save (the record gains ``trained: True``); reused when ``folder`` holds a finished run with the
    same settings. ``kind``: ``lookback`` or ``captions`` (module docstring)."""
    import dataclasses

    import torch

    from ett_ds.data.text import TextTokenizer
    from ett_ds.engine.zero3 import no_zero_init
    from ett_ds.models.llm import build_llm, resize_for_vocab

    spm_path = cfg.model.llm.text_tokenizer
    plan = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "init_config": cfg.model.llm.init_config,
            "spm_sha256": sha256(spm_path), "captions": len(captions), "corpus_lines": len(corpus), "corpus": kind}
    if kind == "lookback":
        h, w = cfg.data.image_size
        rows = max(1, round((cfg.num_image_tokens * h / w) ** 0.5))  # the image's token grid, rows x cols
        plan.update(noise=noise, kinds=dict(KINDS), num_slots=cfg.num_image_tokens,
                    grid=[rows, cfg.num_image_tokens // rows], version=1)
    rec_path = folder / RECORD
    if rec_path.is_file() and json.loads(rec_path.read_text()).get("plan") == plan:
        return {**json.loads(rec_path.read_text()), "trained": False}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    text = TextTokenizer(spm_path)
    with no_zero_init():  # a ZeRO-3 stage earlier in this process must not partition this plain model
        llm = build_llm(dataclasses.replace(cfg.model.llm, gradient_checkpointing=False))
        resize_for_vocab(llm, text.vocab_size)
    llm.train()
    if kind == "lookback":
        lb = Lookback(text, captions, cfg.data.caption_prompts[0], cfg.num_image_tokens, plan["grid"][1],
                      cfg.data.max_text_tokens)
    else:
        seqs = sequences(text, captions, corpus, cfg.data.caption_prompts[0], cfg.data.max_text_tokens)
    emb = llm.get_input_embeddings()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    curve, t0 = {}, time.time()
    for step in range(1, steps + 1):
        if kind == "lookback":
            rows = [lb.sample(rng) for _ in range(batch)]
            starts = [r[1] for r in rows]
            rows = [r[0] for r in rows]
        else:
            rows = [seqs[rng.randrange(len(seqs))] for _ in range(batch)]
            starts = [1] * batch  # the model shifts labels itself; bos is never a target
        ids, labels, mask = _pad(rows, starts, text.pad_id)
        x = emb(ids)
        if kind == "lookback" and noise > 0:  # slots: token embedding + Gaussian noise of a per-sequence scale
            slot = torch.zeros_like(ids, dtype=torch.bool)
            slot[:, len(lb.head):len(lb.head) + lb.n] = True
            scale = noise * torch.rand(batch, 1, 1) * x.detach().pow(2).mean(-1, keepdim=True).sqrt()
            x = torch.where(slot.unsqueeze(-1), x + scale * torch.randn_like(x), x)
        loss = llm(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            curve[step] = round(loss.item(), 4)
    seconds = round(time.time() - t0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(str(folder))
    rec = {"plan": plan, "loss_curve": curve, "seconds": seconds}
    if kind == "lookback":
        rec["exact_match"] = lookback_accuracy(llm, lb, seed + 1)
    rec_path.write_text(json.dumps(rec, indent=1))
    return {**rec, "trained": True}


def _pad(rows: list[list[int]], starts: list[int], pad_id: int):
    """ids, labels (-100 before each row's ``start`` and on padding) and the attention mask, right-padded."""
    import torch
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, s:len(r)] = torch.tensor(r[s:])
        mask[i, :len(r)] = 1
    return ids, labels, mask


def lookback_accuracy(llm, lb: Lookback, seed: int, n: int = 128) -> dict:
    """Exact match per kind on fresh noise-free sequences: every caption token (and eos) the argmax under teacher
    forcing, which is what greedy decoding produces."""
    import torch
    rng = random.Random(seed)
    llm.eval()
    out = {}
    with torch.no_grad():
        for kind, _ in KINDS:
            rows = [lb.sample(rng, kind) for _ in range(n)]
            ids, labels, mask = _pad([r[0] for r in rows], [r[1] for r in rows], lb.text.pad_id)
            pred = llm(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            tgt = labels[:, 1:]
            ok = ((pred == tgt) | (tgt == -100)).all(-1)
            out[kind] = round(float(ok.float().mean()), 4)
    llm.train()
    return out

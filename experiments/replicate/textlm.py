"""Language pretraining of the tiny LLM on text alone (a plain PyTorch loop), saved for ``model.llm.path=``.

The LLM is built exactly as stage 1 builds it (``ett_ds.models.llm.build_llm`` from the recipe's
``model.llm.init_config``, then ``resize_for_vocab`` to the sentencepiece vocabulary plus the three image tokens), so
the ids it learns are the ids the arms feed it. Sequences:

- captions in the caption layout without the image, ``[bos] prompt caption [eos]`` (the training split's captions);
- corpus lines, ``[bos] line [eos]`` (the text the captions are drawn from).

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


def pretrain(folder: Path, cfg, captions: list[str], corpus: list[str], *, steps: int, batch: int, lr: float,
             seed: int, log_every: int = 50) -> dict:
    """Train and save (the record gains ``trained: True``); reused when ``folder`` holds a finished run with the
    same settings."""
    import dataclasses

    import torch
    from ett_ds.checkpoint.loading import no_zero_init
    from ett_ds.models.llm import build_llm, resize_for_vocab
    from ett_ds.models.text import TextTokenizer

    spm_path = cfg.model.llm.text_tokenizer
    plan = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "init_config": cfg.model.llm.init_config,
            "spm_sha256": sha256(spm_path), "captions": len(captions), "corpus_lines": len(corpus)}
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
    seqs = sequences(text, captions, corpus, cfg.data.caption_prompts[0], cfg.data.max_text_tokens)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    curve, t0 = {}, time.time()
    for step in range(1, steps + 1):
        rows = [seqs[rng.randrange(len(seqs))] for _ in range(batch)]
        width = max(map(len, rows))
        ids = torch.full((batch, width), text.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, 1:len(r)] = torch.tensor(r[1:])  # the model shifts labels itself; bos is never a target
        loss = llm(input_ids=ids, attention_mask=(labels != -100) | (torch.arange(width) == 0), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            curve[step] = round(loss.item(), 4)
    folder.mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(str(folder))
    rec = {"plan": plan, "loss_curve": curve, "seconds": round(time.time() - t0, 1)}
    rec_path.write_text(json.dumps(rec, indent=1))
    return {**rec, "trained": True}

"""Evaluation tasks as objects: ``recon``, ``caption``, ``t2i`` and ``vqa``, each ``update`` -> ``summarize`` ->
``write``.

``ett_ds.evaluate`` runs one shared pass over the evaluation shards: for every batch, each per-batch task
(``recon``, ``caption``) fills its fields into the batch's per-sample records (``{"ref": caption, ...}``, one per
valid row). After the pass, ``t2i`` draws images for the first prompts and ``vqa`` answers its own questions
(:meth:`EvalTask.after_pass`). Each task's :meth:`EvalTask.state` is gathered from every rank; rank 0 calls
:meth:`EvalTask.summarize` (the task's section of ``metrics.json``) and :meth:`EvalTask.write` (its grid or
per-question file). Validation during training scores its captions with :func:`caption_summary`, the same numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..generation import caption, generate_images
from . import metrics as M
from .vqa import run_vqa, summarize_vqa

TASKS = ("recon", "caption", "t2i", "vqa")
DIVERSITY_WARN = 0.2


def mean_finite(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def caption_diversity(hyps: list[str], refs: list[str]) -> dict:
    """``diversity`` = distinct predictions / distinct references (after case and whitespace normalisation;
    None without references), with both counts. A model that ignores the image writes a few captions for every
    input, and its diversity falls towards 1 / distinct references."""
    n_hyp, n_ref = len({M.normalize_text(h) for h in hyps}), len({M.normalize_text(r) for r in refs})
    return {"diversity": n_hyp / n_ref if n_ref else None, "distinct_predictions": n_hyp,
            "distinct_references": n_ref}


def caption_summary(hyps: list[str], refs: list[str]) -> dict:
    """Exact match, corpus and mean CER, and diversity of predicted captions against their references."""
    return {**M.text_scores(hyps, refs),
            "mean_cer": mean_finite([M.char_error_rate(h, r, normalize=True) for h, r in zip(hyps, refs)]),
            **caption_diversity(hyps, refs)}


def ocr_scores(recs: list[dict]) -> dict:
    """The OCR reader's readings of the reconstructions and of the originals against the records' references:
    ``ocr_cer_recon``, ``ocr_cer_original`` (corpus CER), ``ocr_em_recon``, ``ocr_em_original`` (exact match)."""
    refs = [r["ref"] for r in recs]
    recon, orig = (M.text_scores([r[k] for r in recs], refs) for k in ("ocr_recon", "ocr_original"))
    return {"ocr_cer_recon": recon["cer"], "ocr_cer_original": orig["cer"], "ocr_em_recon": recon["exact_match"],
            "ocr_em_original": orig["exact_match"]}


def by_group(recs: list[dict], score) -> dict | None:
    """``{group: {"n": count, **score(its records)}}`` over the records' ``group`` (the eval data's ``--group-by``
    field, e.g. each sample's font family); None when no record has one."""
    groups = sorted({r["group"] for r in recs if r.get("group") is not None})
    if not groups:
        return None
    out = {}
    for g in groups:
        sub = [r for r in recs if r.get("group") == g]
        out[g] = {"n": len(sub), **score(sub)}
    return out


def result_warnings(result: dict) -> list[str]:
    """One-line warnings about a summary (low caption diversity)."""
    cap = result.get("caption") or {}
    d = cap.get("diversity")
    if d is not None and d < DIVERSITY_WARN:
        return [f"caption diversity {d:.3f} < {DIVERSITY_WARN}: {cap['distinct_predictions']} distinct predictions "
                f"for {cap['distinct_references']} distinct references -- captions ignore the image?"]
    return []


class EvalTask:
    """One task. ``update`` runs on every batch of the shared pass (per-batch tasks), ``after_pass`` once after it;
    ``state`` is what rank 0 gathers; ``summarize`` returns the task's section and ``write`` its files."""
    name = ""
    per_batch = False

    def update(self, pixels: torch.Tensor, recs: list[dict]) -> None:
        """Fill this task's fields into the records of one batch's valid rows (``pixels`` in [-1, 1])."""

    def after_pass(self, recs: list[dict]) -> None:
        """Work that needs the whole pass (this rank's records)."""

    def state(self):
        return None

    def summarize(self, recs: list[dict], states: list) -> dict:
        raise NotImplementedError

    def write(self, out: Path, section: dict, states: list) -> None:
        """Files beside ``out`` (the metrics JSON); paths go into ``section``."""


class ReconTask(EvalTask):
    """The tokenizer's round trip: PSNR, SSIM, codebook usage and perplexity, and the OCR CER of the reconstruction
    beside the original's (when an OCR reader is given)."""
    name, per_batch = "recon", True

    def __init__(self, model, reader):
        self.model, self.reader = model, reader
        self.hist = torch.zeros(model.tokenizer.codebook_size, dtype=torch.long)
        self.pics: dict = {}

    @torch.no_grad()
    def update(self, pixels, recs):
        tok = self.model.tokenizer
        q = tok.encode(pixels, losses=False)
        recon = tok.decode(q.z_q).float().clamp(-1, 1)
        self.hist += M.histogram(q.indices.cpu(), tok.codebook_size)
        for r, p, s in zip(recs, M.psnr(recon, pixels).tolist(), M.ssim(recon.cpu(), pixels.cpu()).tolist()):
            r.update(psnr=p, ssim=s)
        if self.reader is not None:
            for r, orig, rec in zip(recs, M.to_uint8_images(pixels), M.to_uint8_images(recon)):
                r["ocr_original"], r["ocr_recon"] = self.reader.read(orig), self.reader.read(rec)
        if not self.pics:
            self.pics = {"input": pixels[:8].cpu(), "recon": recon[:8].cpu()}

    def state(self):
        return {"hist": self.hist, "pics": self.pics}

    def summarize(self, recs, states):
        cb = M.stats_from_histogram(sum(s["hist"] for s in states))
        rec = {"psnr": mean_finite([r["psnr"] for r in recs]), "ssim": mean_finite([r["ssim"] for r in recs]),
               "codebook_usage": cb["usage"], "codebook_perplexity": cb["perplexity"], "codes_used": cb["used"],
               "codebook_size": cb["codebook_size"]}
        ocr = self.reader is not None
        if ocr:
            rec.update(ocr_scores(recs))
        else:
            rec["ocr"] = "skipped: RapidOCR not installed or --ocr off"
        groups = by_group(recs, lambda sub: {
            **({k: v for k, v in ocr_scores(sub).items() if k.startswith("ocr_cer")} if ocr else {}),
            "psnr": mean_finite([r["psnr"] for r in sub])})
        if groups:
            rec["by_group"] = groups
        return rec

    def write(self, out, section, states):
        pics = states[0]["pics"]  # rank 0's first batch
        if pics:
            section["grid"] = str(M.save_grid([pics["input"], pics["recon"]], out.with_name(out.stem + "_recon.png"),
                                              labels=["input", "recon"], scale=2))


class CaptionTask(EvalTask):
    """Greedy captions with the checkpoint's prompt (a one-turn chat for ``sft``), scored by :func:`caption_summary`."""
    name, per_batch = "caption", True

    def __init__(self, model, text, max_new_tokens: int):
        self.model, self.text, self.max_new_tokens = model, text, max_new_tokens

    @torch.no_grad()
    def update(self, pixels, recs):
        for r, c in zip(recs, caption(self.model, self.text, pixels, max_new_tokens=self.max_new_tokens)):
            r["caption"] = c

    def summarize(self, recs, states):
        out = caption_summary([r["caption"] for r in recs], [r["ref"] for r in recs])
        groups = by_group(recs, lambda sub: {
            k: v for k, v in caption_summary([r["caption"] for r in sub], [r["ref"] for r in sub]).items()
            if k in ("exact_match", "cer")})
        if groups:
            out["by_group"] = groups
        return out


class T2ITask(EvalTask):
    """An image drawn for each of the first ``num`` reference captions (each rank its share), read back by the OCR
    reader when there is one; a grid ``<out stem>_t2i.png``."""
    name = "t2i"

    def __init__(self, model, text, reader, num: int, world: int, sampling: dict, seed: int):
        """``sampling``: ``generate_images``' cfg_scale, temperature, top_k, top_p (``SamplingConfig.t2i()``)."""
        self.model, self.text, self.reader, self.num, self.world = model, text, reader, num, world
        self.sampling = {**sampling, "seed": seed}
        self.items: list[dict] = []
        self.images = torch.zeros(0)

    @torch.no_grad()
    def after_pass(self, recs):
        mine = recs[: math.ceil(self.num / self.world)]
        prompts = [r["ref"] for r in mine]
        if prompts:
            self.images = generate_images(self.model, self.text, prompts, **self.sampling).cpu()
        else:
            self.images = torch.zeros(0, 3, *self.model.cfg.data.image_size)
        gen = [M.to_uint8_images(im)[0] for im in self.images]
        self.items = [{"prompt": p, "ocr": self.reader.read(g) if self.reader else None} for p, g in zip(prompts, gen)]

    def state(self):
        return {"items": self.items, "images": self.images}

    def summarize(self, recs, states):
        items = [x for s in states for x in s["items"]][: self.num]
        res = {"num": len(items)}
        if self.reader is not None:
            scores = M.text_scores([x["ocr"] for x in items], [x["prompt"] for x in items])
            res["ocr_cer"], res["ocr_exact_match"] = scores["cer"], scores["exact_match"]
        return res

    def write(self, out, section, states):
        imgs = torch.cat([s["images"] for s in states])[: self.num]
        grid = M.save_grid([imgs], out.with_name(out.stem + "_t2i.png"), labels=["t2i"], scale=2)
        section["grid"] = str(grid)
        section["samples"] = [{**x, "task": "t2i"} for s in states for x in s["items"]][: self.num]


class VQATask(EvalTask):
    """Short-answer VQA on its own data (a JSONL or shards with questions), scored by the standard VQA accuracy;
    per-question records go to ``<out stem>_vqa.jsonl``."""
    name = "vqa"

    def __init__(self, model, text, cfg, data: str, prompt: str, batch_size: int, max_new_tokens: int, rank: int,
                 world: int, max_samples: int | None):
        self.args = (model, text, cfg, data, prompt, batch_size, max_new_tokens, rank, world,
                     math.ceil(max_samples / world) if max_samples else None)
        self.prompt, self.max_samples = prompt, max_samples
        self.recs: list[dict] = []
        self.stats: dict = {}

    def after_pass(self, recs):
        self.recs, self.stats = run_vqa(*self.args)

    def state(self):
        return {"recs": self.recs}

    def _all(self, states) -> list[dict]:
        return [r for s in states for r in s["recs"]][: self.max_samples or None]

    def summarize(self, recs, states):
        return summarize_vqa(self._all(states), self.prompt)

    def write(self, out, section, states):
        section["samples"] = str(out.with_name(out.stem + "_vqa.jsonl"))
        with open(section["samples"], "w") as fh:
            for i, r in enumerate(self._all(states)):
                fh.write(json.dumps({"index": i, **r}) + "\n")

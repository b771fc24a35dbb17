"""Evaluate a checkpoint: ``python -m ett_ds.evaluate --ckpt PATH --data SHARDS --tasks recon,caption,t2i
--out metrics.json``.

Tasks
- ``recon``: the tokenizer's round trip. PSNR and SSIM (skimage) per image, codebook usage / perplexity over the
  whole evaluation set, and -- when RapidOCR is installed -- the OCR character error rate of the reconstruction
  against the sample's reference text, next to the OCR CER of the original image (the reader's own ceiling).
- ``caption``: greedy caption of each image with the training prompt; exact match, CER and caption diversity
  against the reference; per-sample outputs go to ``<out stem>_samples.jsonl``.
- ``t2i``: an image generated from each of the first ``--t2i-samples`` captions, read back by the OCR reader (CER,
  and ``ocr_exact_match``: the share of images read back as exactly their prompt),
  and a grid ``<out stem>_t2i.png``. Skipped with a note when the checkpoint has no visual head.
- ``vqa``: short-answer visual question answering on ``--data`` = a JSONL of ``{image (relative to the JSONL),
  question, answers: [10 strings]}`` or shards whose json holds question/answers: greedy answers to
  ``--vqa-prompt`` (an ``sft`` checkpoint is asked in a one-turn chat), scored with the standard VQA accuracy
  (``ett_ds/eval/vqa.py``: min(#matching human answers / 3, 1) averaged over the 10 leave-one-out subsets, after the
  standard answer normalisation); per-question records go to ``<out stem>_vqa.jsonl``. A JSONL serves only vqa.

``--ckpt`` is a training step folder, a run folder (newest complete step) or an export folder. Launched with
several ranks (torchrun / deepspeed), every rank evaluates its own slice of the shards (the same number of batches
on every rank, padding rows masked by ``batch["valid"]``); rank 0 gathers the records, prints a table and writes
the files. The model is a plain module per rank (``ett_ds.checkpoint.loading``), not a ZeRO-3 engine.
Errors (missing checkpoint or data, a task the checkpoint cannot do) print one line and exit 2.

Images are fitted to the checkpoint's ``data.image_size`` by its ``data.resize_mode`` (crop | pad | stretch, as in
training; ``--resize-mode`` overrides it); one warning line says when the images' aspect ratio differs from the
training size's by more than 10 % (crop then cuts part of each image off).

Metrics (texts are compared after case-folding and collapsing whitespace)
- ``exact_match``: fraction of samples whose prediction equals the reference.
- ``cer``: corpus character error rate = total edit distance (Levenshtein: insertions, deletions, substitutions)
  over all samples / total reference characters; long references weigh more.
- ``mean_cer``: the mean over samples of each sample's edit distance / its reference length.
  Both CERs are 0 for perfect output and 1 for an empty one, and both exceed 1 when the model babbles: every
  character written beyond the reference's length is one more edit, so a long wrong caption for a short
  reference scores far above 1. ``mean_cer`` > ``cer`` means the short references are the badly read ones.
- ``diversity``: distinct predictions / distinct references. Below 0.2 a warning line is printed (the captions
  barely depend on the image: the model may be ignoring it); ``distinct_predictions`` / ``distinct_references``
  are the two counts.
- ``recon``: ``psnr`` (dB) and ``ssim`` per image, averaged; ``codebook_usage`` (fraction of codes used),
  ``codebook_perplexity``; ``ocr_cer_recon`` / ``ocr_cer_original``: corpus CER of the OCR reading of the
  reconstruction / of the input image itself (the reader's ceiling), ``ocr_em_*`` their exact match.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

TASKS = ("recon", "caption", "t2i", "vqa")


class EvalError(Exception):
    """A one-line user error (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    from data_tools.cli import DefaultsHelpFormatter  # the docstring as written, every default shown
    from .eval.vqa import DEFAULT_PROMPT
    ap = argparse.ArgumentParser(prog="python -m ett_ds.evaluate", description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="step folder, run folder or export folder")
    ap.add_argument("--data", default=None, help="eval shards (default: the checkpoint config's data.eval)")
    ap.add_argument("--tasks", default="recon,caption", help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--out", required=True, help="metrics JSON path")
    ap.add_argument("--batch-size", type=int, default=16, help="images per forward pass (per rank)")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after about this many samples (all ranks)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    ap.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
    ap.add_argument("--ocr", choices=("auto", "on", "off"), default="auto",
                    help="OCR scoring (auto: when rapidocr-onnxruntime is installed)")
    ap.add_argument("--t2i-samples", type=int, default=8, help="captions turned into images for t2i")
    ap.add_argument("--cfg-scale", type=float, default=3.0, help="t2i classifier-free guidance scale")
    ap.add_argument("--t2i-temperature", type=float, default=1.0,
                    help="t2i sampling temperature (0: greedy, the most likely code at every position)")
    ap.add_argument("--t2i-top-k", type=int, default=0, help="t2i: sample among the k most likely codes (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="t2i sampling seed")
    ap.add_argument("--vqa-prompt", default=DEFAULT_PROMPT, help="vqa: the question's prompt, with {question}")
    ap.add_argument("--vqa-max-new-tokens", type=int, default=10, help="vqa: longest answer in tokens")
    ap.add_argument("--resize-mode", choices=("crop", "pad", "stretch"), default=None,
                    help="how images are fitted to the training size (default: the checkpoint's data.resize_mode)")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv):
    return build_parser().parse_args(argv)


# -- distributed ---------------------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int]:
    from .engine import dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_distributed()
    return dist.rank(), dist.world_size()


def gather(obj, world: int) -> list:
    """Every rank's ``obj`` (a list on every rank; ``[obj]`` in one process)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# -- pieces --------------------------------------------------------------------------------------------------------
def _ocr_reader(mode: str):
    from .eval import ocr
    if mode == "off" or (mode == "auto" and not ocr.available()):
        return None
    if not ocr.available():
        raise EvalError(f"--ocr on: RapidOCR is not installed ({ocr.INSTALL_HINT})")
    return ocr.OCRReader()


def _load(ckpt: str, tasks: list[str], device):
    from .checkpoint import CheckpointError
    from .checkpoint.loading import load_model
    require = "llm" if ("caption" in tasks or "vqa" in tasks) else None
    try:
        return load_model(ckpt, device=device, require=require)
    except CheckpointError as e:
        raise EvalError(str(e).splitlines()[0]) from None


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


@torch.no_grad()
def evaluate_batch(model, text, batch, tasks, reader, device, max_new_tokens) -> tuple[list[dict], torch.Tensor, dict]:
    """Records of the batch's valid rows, the codebook histogram of those rows, and the first reconstructions."""
    from .data.transforms import to_unit_range
    from .eval import metrics as M
    from .generation import caption
    valid = batch["valid"].bool()
    pixels = to_unit_range(batch["pixels"][valid].to(device))
    refs = [t for t, v in zip(batch["text"], valid.tolist()) if v]
    recs = [{"ref": r} for r in refs]
    hist = torch.zeros(model.tokenizer.codebook_size, dtype=torch.long)
    pics = {}
    if not len(refs):
        return recs, hist, pics
    if "recon" in tasks:
        tok = model.tokenizer
        q = tok.encode(pixels, losses=False)
        recon = tok.decode(q.z_q).float().clamp(-1, 1)
        hist += M.histogram(q.indices.cpu(), tok.cfg.codebook_size)
        for r, p, s in zip(recs, M.psnr(recon, pixels).tolist(), M.ssim(recon.cpu(), pixels.cpu()).tolist()):
            r.update(psnr=p, ssim=s)
        if reader is not None:
            for r, orig, rec in zip(recs, M.to_uint8_images(pixels), M.to_uint8_images(recon)):
                r["ocr_original"], r["ocr_recon"] = reader.read(orig), reader.read(rec)
        pics = {"input": pixels.cpu(), "recon": recon.cpu()}
    if "caption" in tasks:
        for r, c in zip(recs, caption(model, text, pixels, max_new_tokens=max_new_tokens)):
            r["caption"] = c
    return recs, hist, pics


def t2i_images(model, text, prompts, args, device) -> torch.Tensor:
    from .generation import generate_images
    if not prompts:
        return torch.zeros(0, 3, *model.cfg.data.image_size)
    return generate_images(model, text, prompts, cfg_scale=args.cfg_scale, temperature=args.t2i_temperature,
                           top_k=args.t2i_top_k, seed=args.seed).cpu()


def summarize(recs: list[dict], hist: torch.Tensor, tasks: list[str], reader_on: bool) -> dict:
    from .eval import metrics as M
    out: dict = {"num_samples": len(recs)}
    refs = [r["ref"] for r in recs]
    if "recon" in tasks:
        cb = M.stats_from_histogram(hist)
        rec = {"psnr": _mean([r["psnr"] for r in recs]), "ssim": _mean([r["ssim"] for r in recs]),
               "codebook_usage": cb["usage"], "codebook_perplexity": cb["perplexity"], "codes_used": cb["used"],
               "codebook_size": cb["codebook_size"]}
        if reader_on:
            rec["ocr_cer_recon"] = M.corpus_cer([r["ocr_recon"] for r in recs], refs, normalize=True)
            rec["ocr_cer_original"] = M.corpus_cer([r["ocr_original"] for r in recs], refs, normalize=True)
            rec["ocr_em_recon"] = M.mean_exact_match([r["ocr_recon"] for r in recs], refs)
            rec["ocr_em_original"] = M.mean_exact_match([r["ocr_original"] for r in recs], refs)
        else:
            rec["ocr"] = "skipped: RapidOCR not installed or --ocr off"
        out["recon"] = rec
    if "caption" in tasks:
        hyps = [r["caption"] for r in recs]
        out["caption"] = {"exact_match": M.mean_exact_match(hyps, refs),
                          "cer": M.corpus_cer(hyps, refs, normalize=True),
                          "mean_cer": _mean([M.char_error_rate(h, r, normalize=True) for h, r in zip(hyps, refs)]),
                          **caption_diversity(hyps, refs)}
    return out


DIVERSITY_WARN = 0.2


def caption_diversity(hyps: list[str], refs: list[str]) -> dict:
    """``diversity`` = distinct predictions / distinct references (after case and whitespace normalisation;
    None without references), with both counts. A model that ignores the image writes a few captions for every
    input, and its diversity falls towards 1 / distinct references."""
    from .eval.metrics import normalize_text
    n_hyp, n_ref = len({normalize_text(h) for h in hyps}), len({normalize_text(r) for r in refs})
    return {"diversity": n_hyp / n_ref if n_ref else None, "distinct_predictions": n_hyp,
            "distinct_references": n_ref}


def result_warnings(result: dict) -> list[str]:
    """One-line warnings about a summary (low caption diversity)."""
    cap = result.get("caption") or {}
    d = cap.get("diversity")
    if d is not None and d < DIVERSITY_WARN:
        return [f"caption diversity {d:.3f} < {DIVERSITY_WARN}: {cap['distinct_predictions']} distinct predictions "
                f"for {cap['distinct_references']} distinct references -- captions ignore the image?"]
    return []


def print_table(result: dict) -> None:
    rows = [("samples", result["num_samples"])]
    for task in TASKS:
        for k, v in (result.get(task) or {}).items():
            if isinstance(v, (int, float, str)) and k not in ("grid",):
                rows.append((f"{task}.{k}", v))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")


# -- main ----------------------------------------------------------------------------------------------------------
def run(args) -> dict | None:
    from .data.batch import Batcher
    from .data.decode import DataErrorRateExceeded, check_error_rate
    from .data.eval_stream import eval_batches
    from .data.shards import expand_urls
    from .eval import metrics as M
    from .models.ett import STAGE_SPECS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise EvalError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
    if not Path(args.ckpt).exists():
        raise EvalError(f"checkpoint not found: {args.ckpt}")
    rank, world = _dist_setup()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    loaded = _load(args.ckpt, tasks, device)
    model, text, cfg = loaded.model, loaded.text, loaded.cfg
    if args.resize_mode is not None:
        cfg.data.resize_mode = args.resize_mode
    data = args.data or cfg.data.eval
    if not data:
        raise EvalError("no --data given and the checkpoint's config has no data.eval")
    jsonl = str(data).endswith((".jsonl", ".ndjson"))
    if jsonl and tasks != ["vqa"]:
        raise EvalError(f"--data {data}: a JSONL serves only --tasks vqa (the other tasks read shards)")
    if "vqa" in tasks and "{question}" not in args.vqa_prompt:
        raise EvalError("--vqa-prompt must contain {question}")
    try:
        if jsonl:
            if not Path(data).is_file():
                raise FileNotFoundError(f"no such file: {data}")
        else:
            expand_urls(data)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    notes = {}
    if "t2i" in tasks and not STAGE_SPECS[cfg.stage].generate:
        tasks.remove("t2i")
        notes["t2i"] = {"skipped": f"stage={cfg.stage} checkpoint has no visual head (t2i needs a stage=t2i one)"}
    reader = _ocr_reader(args.ocr) if ("recon" in tasks or "t2i" in tasks) else None
    needs_text = text if ("caption" in tasks or "t2i" in tasks) else None
    batcher = Batcher(cfg, text if STAGE_SPECS[cfg.stage].uses_llm else None, train=False)
    max_batches = None
    if args.max_samples:
        max_batches = max(1, math.ceil(args.max_samples / (args.batch_size * world)))
    t0 = time.time()
    recs, hist, pics = [], torch.zeros(cfg.model.tokenizer.codebook_size, dtype=torch.long), {}
    stats = Counter()
    batches = [] if tasks == ["vqa"] else \
        eval_batches(data, batch_size=args.batch_size, make_example=batcher.make_example, collate=batcher.collate,
                     rank=rank, world_size=world, num_workers=args.num_workers, max_batches=max_batches)
    for batch in batches:
        stats.update(batch.get("data_stats") or {})
        r, h, p = evaluate_batch(model, needs_text, batch, tasks, reader, device, cfg.data.max_text_tokens + 1)
        recs += r
        hist += h
        if not pics and p:
            pics = {k: v[:8] for k, v in p.items()}
    t2i = None
    if "t2i" in tasks:  # each rank draws its share of the first --t2i-samples captions
        mine = recs[: math.ceil(args.t2i_samples / world)]
        imgs = t2i_images(model, text, [r["ref"] for r in mine], args, device)
        gen = [M.to_uint8_images(im)[0] for im in imgs]
        t2i = [{"prompt": r["ref"], "ocr": reader.read(g) if reader else None} for r, g in zip(mine, gen)], imgs
    vqa = None
    if "vqa" in tasks:
        from .eval.vqa import run_vqa
        per_rank = math.ceil(args.max_samples / world) if args.max_samples else None
        vqa, vqa_stats = run_vqa(model, text, cfg, str(data), args.vqa_prompt, args.batch_size,
                                 args.vqa_max_new_tokens, rank, world, per_rank)
        stats.update(vqa_stats)
    gathered = gather((recs, hist, t2i, pics, stats, vqa), world)
    data_stats = sum((g[4] for g in gathered), Counter())
    try:  # every rank holds the same totals after the gather, so every rank stops alike (no hung collective)
        check_error_rate(data_stats, cfg.data.max_error_rate, min_samples=1, where=str(data))
    except DataErrorRateExceeded as e:
        raise EvalError(f"{e} (data.max_error_rate comes from the checkpoint's config)") from None
    if rank != 0:
        return None
    all_recs = [r for g in gathered for r in g[0]]
    if args.max_samples:
        all_recs = all_recs[: args.max_samples]
    total_hist = sum(g[1] for g in gathered)
    result = {"ckpt": str(loaded.source), "stage": cfg.stage, "visual_input": cfg.model.visual_input,
              "data": str(data), "world_size": world, "tasks": tasks, "resize_mode": cfg.data.resize_mode,
              "image_size": list(cfg.data.image_size), "data_stats": dict(sorted(data_stats.items())),
              **summarize(all_recs, total_hist, tasks, reader is not None)}
    result["warnings"] = result_warnings(result)
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if t2i is not None:
        items = [x for g in gathered for x in g[2][0]][: args.t2i_samples]
        imgs = torch.cat([g[2][1] for g in gathered])[: args.t2i_samples]
        grid = M.save_grid([imgs], out.with_name(out.stem + "_t2i.png"), labels=["t2i"], scale=2)
        res = {"num": len(items), "grid": str(grid)}
        if reader is not None:
            res["ocr_cer"] = M.corpus_cer([x["ocr"] for x in items], [x["prompt"] for x in items], normalize=True)
            res["ocr_exact_match"] = M.mean_exact_match([x["ocr"] for x in items], [x["prompt"] for x in items])
        result["t2i"] = res
        for x in items:
            x["task"] = "t2i"
    if vqa is not None:
        from .eval.vqa import summarize_vqa
        vqa_recs = [r for g in gathered for r in g[5]][: args.max_samples or None]
        result["vqa"] = summarize_vqa(vqa_recs, args.vqa_prompt)
        result["vqa"]["samples"] = str(out.with_name(out.stem + "_vqa.jsonl"))
        with open(result["vqa"]["samples"], "w") as fh:
            for i, r in enumerate(vqa_recs):
                fh.write(json.dumps({"index": i, **r}) + "\n")
    result.update(notes)
    pics = gathered[0][3]
    if pics and "recon" in result:
        result["recon"]["grid"] = str(M.save_grid([pics["input"], pics["recon"]], out.with_name(out.stem + "_recon.png"),
                                                   labels=["input", "recon"], scale=2))
    with open(out.with_name(out.stem + "_samples.jsonl"), "w") if tasks != ["vqa"] else open(os.devnull, "w") as fh:
        for i, r in enumerate(all_recs):
            fh.write(json.dumps({"index": i, **r}) + "\n")
    if t2i is not None:
        result["t2i"]["samples"] = items
    result["seconds"] = round(time.time() - t0, 2)
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args)
    except (EvalError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        return 2
    if result is not None and not args.quiet:
        print_table(result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
  and a grid ``<out stem>_t2i.png``. Skipped with a note when the checkpoint has no visual head. Guidance,
  temperature, top-k and top-p are the checkpoint config's ``sampling`` values unless a flag sets them.
- ``vqa``: short-answer visual question answering on ``--data`` = a JSONL of ``{image (relative to the JSONL),
  question, answers: [10 strings]}`` or shards whose json holds question/answers: greedy answers to
  ``--vqa-prompt`` (an ``sft`` checkpoint is asked in a one-turn chat), scored with the standard VQA accuracy
  (``ett_ds/eval/vqa.py``: min(#matching human answers / 3, 1) averaged over the 10 leave-one-out subsets, after the
  standard answer normalisation); per-question records go to ``<out stem>_vqa.jsonl``. A JSONL serves only vqa.

``--ckpt`` is a training step folder, a run folder (newest complete step) or an export folder. Launched with
several ranks (torchrun / deepspeed), every rank evaluates its own slice of the shards (the same number of batches
on every rank, padding rows masked by ``batch["valid"]``); rank 0 gathers the records, prints a table and writes
the files. The model is a plain module per rank (``ett_ds.models.loading``), not a ZeRO-3 engine.
Errors (missing checkpoint or data, a task the checkpoint cannot do) print one line and exit 2
(``commandline.run_cli``).

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

from .checkpoint import CheckpointError
from .commandline import OneLineParser, UserError, run_cli
from .data.batch import Batcher
from .data.decode import DataErrorRateExceeded, check_error_rate
from .data.eval_stream import eval_batches
from .data.shards import expand_urls
from .data.transforms import to_unit_range
from .engine import dist
from .eval import ocr
from .eval.tasks import TASKS, CaptionTask, EvalTask, ReconTask, T2ITask, VQATask, caption_diversity, result_warnings  # noqa: F401
from .eval.vqa import DEFAULT_PROMPT
from .models.loading import load_model
from .stages import STAGE_SPECS


class EvalError(UserError):
    """A bad argument or input of ``python -m ett_ds.evaluate``: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m ett_ds.evaluate", description=__doc__)
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
    ap.add_argument("--cfg-scale", type=float, default=None, help="t2i classifier-free guidance scale; <= 0 turns it "
                    "off (default: the checkpoint's sampling.cfg_scale)")
    ap.add_argument("--t2i-temperature", type=float, default=None,
                    help="t2i sampling temperature, 0: greedy, the most likely code at every position (default: the "
                         "checkpoint's sampling.t2i_temperature)")
    ap.add_argument("--t2i-top-k", type=int, default=None, help="t2i: sample among the k most likely codes, 0: all "
                    "(default: the checkpoint's sampling.t2i_top_k)")
    ap.add_argument("--t2i-top-p", type=float, default=None, help="t2i: nucleus sampling of the codes, 1: all "
                    "(default: the checkpoint's sampling.t2i_top_p)")
    ap.add_argument("--seed", type=int, default=0, help="t2i sampling seed")
    ap.add_argument("--vqa-prompt", default=DEFAULT_PROMPT, help="vqa: the question's prompt, with {question}")
    ap.add_argument("--vqa-max-new-tokens", type=int, default=10, help="vqa: longest answer in tokens")
    ap.add_argument("--resize-mode", choices=("crop", "pad", "stretch"), default=None,
                    help="how images are fitted to the training size (default: the checkpoint's data.resize_mode)")
    ap.add_argument("--group-by", default="family",
                    help="caption and recon scores also per value of this json field of the samples, as by_group "
                         "(the demo's: family, the font family); '' turns it off, samples without it are only pooled")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv):
    return build_parser().parse_args(argv)


# -- distributed ---------------------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int]:
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
    if mode == "off" or (mode == "auto" and not ocr.available()):
        return None
    if not ocr.available():
        raise EvalError(f"--ocr on: RapidOCR is not installed ({ocr.INSTALL_HINT})")
    return ocr.OCRReader()


def _load(ckpt: str, tasks: list[str], device):
    require = "llm" if ("caption" in tasks or "vqa" in tasks) else None
    try:
        return load_model(ckpt, device=device, require=require)
    except CheckpointError as e:
        raise EvalError(str(e).splitlines()[0]) from None


def print_table(result: dict) -> None:
    rows = [("samples", result["num_samples"])]
    for task in TASKS:
        for k, v in (result.get(task) or {}).items():
            if isinstance(v, (int, float, str)) and k not in ("grid",):
                rows.append((f"{task}.{k}", v))
        for g, scores in ((result.get(task) or {}).get("by_group") or {}).items():
            rows += [(f"{task}.{k}[{g}]", v) for k, v in scores.items() if k != "n"]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")


# -- main ----------------------------------------------------------------------------------------------------------
def _parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise EvalError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
    return tasks


def _check_data(data, tasks: list[str], args) -> bool:
    """Whether ``data`` is a VQA JSONL; one-line errors for data the tasks cannot read."""
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
    return jsonl


T2I_FLAGS = ("cfg_scale", "t2i_temperature", "t2i_top_k", "t2i_top_p")  # each the same key of cfg.sampling


def t2i_sampling(args, cfg) -> dict:
    """``generate_images``' guidance and sampling keywords: each t2i flag given, else the checkpoint config's
    ``sampling`` value."""
    return cfg.sampling.with_overrides(**{k: getattr(args, k) for k in T2I_FLAGS}).t2i()


def build_tasks(names: list[str], loaded, reader, args, data, rank: int, world: int) -> list[EvalTask]:
    model, text, cfg = loaded.model, loaded.text, loaded.cfg
    make = {
        "recon": lambda: ReconTask(model, reader),
        "caption": lambda: CaptionTask(model, text, cfg.data.max_text_tokens + 1),
        "t2i": lambda: T2ITask(model, text, reader, args.t2i_samples, world, t2i_sampling(args, cfg), args.seed),
        "vqa": lambda: VQATask(model, text, cfg, str(data), args.vqa_prompt, args.batch_size,
                               args.vqa_max_new_tokens, rank, world, args.max_samples),
    }
    return [make[n]() for n in names]


def _shared_pass(tasks: list[EvalTask], loaded, data, args, rank: int, world: int, device) -> tuple[list, Counter]:
    """The one pass over the evaluation shards: each per-batch task fills the records of the batch's valid rows."""
    cfg = loaded.cfg
    per_batch = [t for t in tasks if t.per_batch]
    recs, stats = [], Counter()
    if not per_batch and all(t.name == "vqa" for t in tasks):
        return recs, stats
    batcher = Batcher(cfg, loaded.text if STAGE_SPECS[cfg.stage].uses_llm else None, train=False,
                      group_by=args.group_by or None)
    max_batches = max(1, math.ceil(args.max_samples / (args.batch_size * world))) if args.max_samples else None
    for batch in eval_batches(data, batch_size=args.batch_size, make_example=batcher.make_example,
                              collate=batcher.collate, rank=rank, world_size=world, num_workers=args.num_workers,
                              max_batches=max_batches):
        stats.update(batch.get("data_stats") or {})
        valid = batch["valid"].bool()
        groups = batch.get("group") or [None] * len(batch["text"])
        batch_recs = [{"ref": t} if g is None else {"ref": t, "group": g}
                      for t, g, v in zip(batch["text"], groups, valid.tolist()) if v]
        if batch_recs:
            pixels = to_unit_range(batch["pixels"][valid].to(device))
            for task in per_batch:
                task.update(pixels, batch_recs)
        recs += batch_recs
    return recs, stats


def _setup(args, names: list[str]):
    """Load: the process group, the device, the checkpoint's model and config, and the data it is scored on."""
    if not Path(args.ckpt).exists():
        raise EvalError(f"checkpoint not found: {args.ckpt}")
    rank, world = _dist_setup()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    loaded = _load(args.ckpt, names, device)
    if args.resize_mode is not None:
        loaded.cfg.data.resize_mode = args.resize_mode
    data = args.data or loaded.cfg.data.eval
    _check_data(data, names, args)
    return loaded, data, rank, world, device


def _runnable(names: list[str], cfg) -> tuple[list[str], dict]:
    """The tasks of ``names`` the checkpoint can run (no t2i without a visual head) and notes on those it cannot."""
    if "t2i" in names and not STAGE_SPECS[cfg.stage].generate:
        return [n for n in names if n != "t2i"], {
            "t2i": {"skipped": f"stage={cfg.stage} checkpoint has no visual head (t2i needs a stage=t2i one)"}}
    return names, {}


def _gather_checked(recs, stats, tasks, world: int, cfg, data):
    """Every rank's records, counters and task states; past the checkpoint's data.max_error_rate a one-line error."""
    gathered = gather((recs, stats, [t.state() for t in tasks]), world)
    data_stats = sum((g[1] for g in gathered), Counter())
    try:  # every rank holds the same totals after the gather, so every rank stops alike (no hung collective)
        check_error_rate(data_stats, cfg.data.max_error_rate, min_samples=1, where=str(data))
    except DataErrorRateExceeded as e:
        raise EvalError(f"{e} (data.max_error_rate comes from the checkpoint's config)") from None
    return gathered, data_stats


def _write(args, loaded, data, world: int, names: list[str], tasks, gathered, data_stats, notes: dict,
           t0: float) -> dict:
    """Rank 0: each task's summary and files, the warnings, the per-sample records and the metrics JSON."""
    cfg = loaded.cfg
    all_recs = [r for g in gathered for r in g[0]][: args.max_samples or None]
    result = {"ckpt": str(loaded.source), "stage": cfg.stage, "visual_input": cfg.model.visual_input,
              "data": str(data), "world_size": world, "tasks": names, "resize_mode": cfg.data.resize_mode,
              "image_size": list(cfg.data.image_size), "data_stats": dict(sorted(data_stats.items())),
              "num_samples": len(all_recs)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(tasks):
        states = [g[2][i] for g in gathered]
        result[task.name] = task.summarize(all_recs, states)
        task.write(out, result[task.name], states)
    result["warnings"] = result_warnings(result)
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    result.update(notes)
    if names != ["vqa"]:
        with open(out.with_name(out.stem + "_samples.jsonl"), "w") as fh:
            for i, r in enumerate(all_recs):
                fh.write(json.dumps({"index": i, **r}) + "\n")
    result["seconds"] = round(time.time() - t0, 2)
    out.write_text(json.dumps(result, indent=1))
    return result


def run(args) -> dict | None:
    """Load, build the tasks, one pass over the data, gather, write (rank 0; the other ranks return None)."""
    names = _parse_tasks(args.tasks)
    loaded, data, rank, world, device = _setup(args, names)
    names, notes = _runnable(names, loaded.cfg)
    reader = _ocr_reader(args.ocr) if ("recon" in names or "t2i" in names) else None
    tasks = build_tasks(names, loaded, reader, args, data, rank, world)
    t0 = time.time()
    with torch.no_grad():
        recs, stats = _shared_pass(tasks, loaded, data, args, rank, world, device)
        for task in tasks:
            task.after_pass(recs)
            stats.update(getattr(task, "stats", None) or {})
    gathered, data_stats = _gather_checked(recs, stats, tasks, world, loaded.cfg, data)
    if rank != 0:
        return None
    return _write(args, loaded, data, world, names, tasks, gathered, data_stats, notes, t0)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    result = run(args)
    if result is not None and not args.quiet:
        print_table(result)
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m data_tools SUBCOMMAND``: argument parsing and one-line errors; the work lives in the other modules.

``main(argv)`` returns the exit code (0 ok, 1 verify found problems, 2 usage error, 130 interrupted) and never prints
a traceback for a bad argument or a missing input (``ett_ds.commandline.run_cli``), so tests and scripts can call it
directly.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ett_ds.commandline import run_cli

from . import importers
from .demo import DemoOptions, build_demo
from .errors import Parser, UsageError
from .instruct import main as instruct_main
from .llava import llava_to_shards
from .shard import EncodeOptions, items_from_folder, items_from_manifest, shard_items
from .spm import train_spm
from .synth_text import SynthConfig, resolve_fonts, synth_text


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 32x128, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        v = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 500M, got {text!r}")
    return v


def _add_output(p, prefix: str, per_shard: int):
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default=prefix, help="shard name prefix: PREFIX-000000.tar")
    p.add_argument("--samples-per-shard", type=_positive, default=per_shard, help="samples per shard")
    p.add_argument("--workers", type=_positive, default=1, help="processes (spawn pool), one shard per task")
    p.add_argument("--resume", action="store_true", help="skip shards whose _stats.json exists")
    p.add_argument("--overwrite", action="store_true", help="delete existing shards with this prefix first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_encode(p, fmt="keep", max_side=None):
    p.add_argument("--max-side", type=_positive, default=max_side, help="resize so the longest side is at most N")
    p.add_argument("--min-side", type=_positive, default=8, help="shorter side below N -> too_small")
    p.add_argument("--max-pixels", type=_positive, default=128_000_000, help="w*h above N -> too_large")
    p.add_argument("--format", choices=["keep", "jpg", "png", "webp"], default=fmt,
                   help="image format in the shards (keep: the source's when it is jpg/png/webp, else png)")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality when re-encoding")
    p.add_argument("--validate", choices=["quick", "full"], default="quick",
                   help="pass-through images: quick = header + end marker, full = decode every image")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="data_tools", description="Build, check and synthesise WebDataset shards for ett_ds.")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    p = sub.add_parser("shard", help="folder of images + sidecar captions, or a manifest -> shards")
    p.add_argument("input", help="a folder (a.jpg + a.txt/a.json) or a .jsonl/.csv/.tsv/.parquet manifest")
    p.add_argument("--image-col", default="image", help="manifest column with the image path")
    p.add_argument("--caption-col", default="caption", help="manifest column / sidecar json field with the caption")
    p.add_argument("--image-root", help="base for relative image paths (default: the manifest's folder)")
    p.add_argument("--bytes-per-shard", type=_bytes, help="e.g. 500M (planned on source sizes)")
    _add_output(p, "data", 1000)
    _add_encode(p)

    p = sub.add_parser("llava", help="LLaVA-format conversations (JSON/JSONL) + images -> SFT shards",
                       description=_doc("llava"))
    p.add_argument("input", help="LLaVA JSON list (or JSONL) of {id, image, conversations}")
    p.add_argument("--image-root", help="base of the rows' relative image paths (default: the JSON's folder)")
    _add_output(p, "llava", 1000)
    _add_encode(p)

    p = sub.add_parser("verify", help="re-read every shard of a directory (or URLs) and check it")
    p.add_argument("dir", help="a shard folder, or shard URLs: pipe:CMD, http(s)://.../x.tar, http(s)://.../dir/ "
                               "(the shards its sizes.json lists); join several with ::")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")

    p = sub.add_parser("synth-text", help="render corpus text in fonts -> shards (caption = rendered text)")
    p.add_argument("--fonts", nargs="+", required=True, help="font files or globs")
    p.add_argument("--corpus", nargs="+", required=True, help="text files (one line per sample; WordNet data.*)")
    p.add_argument("--num", type=_positive, required=True, help="samples to render")
    p.add_argument("--size", type=_size, default="32x128", help="HxW")
    p.add_argument("--min-chars", type=_positive, default=1, help="shortest caption in characters")
    p.add_argument("--max-chars", type=_positive, default=32, help="longest caption in characters")
    p.add_argument("--words", help="take a window of LO-HI consecutive words per line, e.g. 1-3")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--text-split", choices=["all", "train", "heldout"], default="all",
                   help="keep captions whose stable hash is in the 90%% train or 10%% held-out bucket")
    p.add_argument("--heldout-percent", type=int, default=10, help="size of the held-out hash bucket")
    p.add_argument("--noise", type=float, default=12.0, help="max std of background noise")
    p.add_argument("--max-rotation", type=float, default=3.0, help="degrees")
    p.add_argument("--slant", type=float, default=0.0, help="augment: max |horizontal shear| of the text (0.25 ~ 14 deg)")
    p.add_argument("--stretch", type=float, default=0.0, help="augment: text width x uniform(1 - S, 1 + S)")
    p.add_argument("--bold", type=float, default=0.0, help="augment: probability of a 1 px heavier stroke")
    p.add_argument("--blur", type=float, default=0.0, help="augment: max Gaussian blur radius (px), half the samples")
    _add_output(p, "synth", 1000)

    p = sub.add_parser("import", help="real captioned images from Debian packages -> shards")
    p.add_argument("source", choices=["tuxpaint", "fashion-mnist"])
    p.add_argument("--root", help="package data folder (default: the Debian install path)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="fashion-mnist split")
    p.add_argument("--limit", type=_positive)
    p.add_argument("--template", default="a photo of a {label}", help="fashion-mnist caption template")
    p.add_argument("--only-category", nargs="+", help="tuxpaint: keep these top-level categories")
    p.add_argument("--exclude-category", nargs="+", help="tuxpaint: drop these (e.g. a held-out category)")
    _add_output(p, None, 1000)
    _add_encode(p, fmt="png")

    p = sub.add_parser("train-spm", help="sentencepiece model from caption text (a run of the own recipe makes "
                                         "its own from data.train: docs/own_data.md)")
    p.add_argument("--input", nargs="+", required=True, help="shard dirs, .tar files or text files")
    p.add_argument("--vocab-size", type=_positive, default=1000, help="vocabulary size")
    p.add_argument("--model-type", choices=["unigram", "bpe", "char", "word"], default="unigram",
                   help="sentencepiece model type")
    p.add_argument("--out", required=True, help="output prefix: PREFIX.model, PREFIX.vocab")
    p.add_argument("--seed", type=int, default=0, help="random seed")

    p = sub.add_parser("instruct", help="caption shards -> instruction (SFT) shards from question templates",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m data_tools.instruct")
    p = sub.add_parser("demo", help="the built-in demo data set for the tiny recipe")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=["numbers", "words"], default="numbers",
                   help="numbers: 3-digit numbers, ink on paper, centred, 32x64 (what the tiny recipe masters on a CPU); "
                        "words: 1-3 words in random colours, 32x128 (harder)")
    p.add_argument("--num-train", type=_positive, default=None, help="default: the task's")
    p.add_argument("--num-heldout", type=_positive, default=None, help="default: the task's")
    p.add_argument("--size", type=_size, default=None, help="HxW (default: the task's)")
    p.add_argument("--words", default=None, help="words: LO-HI words per caption (default 1-3)")
    p.add_argument("--digits", default=None, help="numbers: LO-HI digits per caption (default 3-3)")
    p.add_argument("--max-chars", type=_positive, default=None, help="words: longest caption (default 16)")
    p.add_argument("--vocab-size", type=_positive, default=None, help="sentencepiece vocabulary (default 512)")
    p.add_argument("--samples-per-shard", type=_positive, default=None, help="default 500")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=_positive, default=1, help="processes")
    p.add_argument("--no-augment", action="store_true",
                   help="render the training split plainly (default: slant, width, weight and blur augmentation)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _doc(module: str) -> str:
    return importlib.import_module(f"data_tools.{module}").__doc__


def _words(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
        if not 1 <= lo <= hi:
            raise ValueError
        return lo, hi
    except ValueError:
        raise UsageError(f"--words: expected LO-HI like 1-3, got {text!r}") from None


def _encode_options(a, **overrides):
    kw = dict(format=a.format, quality=a.quality, max_side=a.max_side, min_side=a.min_side,
              max_pixels=a.max_pixels, validate=a.validate)
    kw.update(overrides)
    return EncodeOptions(**kw)


def _print_summary(stats: dict) -> None:
    print(json.dumps(stats, sort_keys=True))


def _cmd_shard(a) -> int:
    src = Path(a.input)
    if not src.exists():
        raise UsageError(f"input not found: {src}")
    if src.is_dir():
        items = items_from_folder(src, caption_col=a.caption_col)
    else:
        items = items_from_manifest(src, a.image_col, a.caption_col, Path(a.image_root) if a.image_root else None)
    if not items:
        raise UsageError(f"no images found in {src}")
    stats = shard_items(items, a.out, prefix=a.prefix, samples_per_shard=a.samples_per_shard,
                        bytes_per_shard=a.bytes_per_shard, opts=_encode_options(a), workers=a.workers,
                        resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress,
                        source_id=str(src.resolve()))
    _print_summary(stats)
    return 0


def _cmd_llava(a) -> int:
    stats = llava_to_shards(a.input, a.out, image_root=a.image_root, prefix=a.prefix,
                            samples_per_shard=a.samples_per_shard, opts=_encode_options(a), workers=a.workers,
                            resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    _print_summary(stats)
    return 0


def _cmd_verify(a) -> int:
    from ett_ds.data.decode import is_url  # reason: torch (ett_ds.data); the other commands run without it

    from .verify import verify_dir, verify_urls  # reason: torch, as above
    if is_url(a.dir):
        report = verify_urls(a.dir)
    elif not Path(a.dir).is_dir():
        raise UsageError(f"not a directory: {a.dir}")
    else:
        report = verify_dir(a.dir)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['dir']}: {report['shards']} shards, {report['samples']} samples, "
              f"{len(report['problems'])} problems")
        for line in report["problems"][:50]:
            print(f"  {line}")
        if len(report["problems"]) > 50:
            print(f"  ... and {len(report['problems']) - 50} more")
    return 1 if report["problems"] else 0


def _cmd_synth(a) -> int:
    if a.min_chars > a.max_chars:
        raise UsageError("--min-chars is larger than --max-chars")
    for c in a.corpus:
        if not Path(c).is_file():
            raise UsageError(f"corpus file not found: {c}")
    cfg = SynthConfig(fonts=tuple(resolve_fonts(a.fonts)), corpus=tuple(str(Path(c).resolve()) for c in a.corpus),
                      height=a.size[0], width=a.size[1], min_chars=a.min_chars, max_chars=a.max_chars,
                      words=_words(a.words), seed=a.seed, text_split=a.text_split,
                      heldout_percent=a.heldout_percent, noise=a.noise, max_rotation=a.max_rotation,
                      slant=a.slant, stretch=a.stretch, bold=a.bold, blur=a.blur)
    stats = synth_text(cfg, a.out, num=a.num, prefix=a.prefix, samples_per_shard=a.samples_per_shard,
                       workers=a.workers, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    _print_summary(stats)
    return 0


def _cmd_import(a) -> int:
    if a.source == "tuxpaint":
        root = Path(a.root) if a.root else importers.TUXPAINT_DIR
        items = importers.tuxpaint_items(root, a.only_category, a.exclude_category)
        if a.limit:
            items = items[:a.limit]
        opts = _encode_options(a, flatten_alpha=True, max_side=a.max_side or 256)
    else:
        root = Path(a.root) if a.root else importers.FASHION_DIR
        items = importers.fashion_mnist_items(root, a.split, a.limit, a.template)
        opts = _encode_options(a)
    prefix = a.prefix or a.source.replace("-", "_")
    stats = shard_items(items, a.out, prefix=prefix, samples_per_shard=a.samples_per_shard, opts=opts,
                        workers=a.workers, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress,
                        source_id=f"{a.source}:{root}:{a.split}")
    _print_summary(stats)
    return 0


def _cmd_spm(a) -> int:
    _print_summary(train_spm(a.input, a.out, vocab_size=a.vocab_size, model_type=a.model_type, seed=a.seed))
    return 0


def _cmd_demo(a) -> int:
    given = {"num_train": a.num_train, "num_heldout": a.num_heldout, "max_chars": a.max_chars,
             "vocab_size": a.vocab_size, "samples_per_shard": a.samples_per_shard, "seed": a.seed,
             "augment": False if a.no_augment else None}
    if a.size:
        given.update(height=a.size[0], width=a.size[1])
    if a.words:
        given.update(zip(("min_words", "max_words"), _words(a.words)))
    if a.digits:
        given.update(zip(("min_digits", "max_digits"), _words(a.digits)))
    opts = DemoOptions.for_task(a.task, **{k: v for k, v in given.items() if v is not None})
    summary = build_demo(a.out, opts, workers=a.workers, progress=not a.no_progress, force=a.force)
    state = "already built, skipped" if summary["skipped"] else f"built in {summary['seconds']} s"
    print(f"demo data in {summary['out']} ({state}): {summary['train_samples']} train samples in "
          f"{summary['train_shards']} shards, {summary['heldout_samples']} held-out samples, "
          f"spm vocab {summary['spm_vocab_size']}, {summary['train_fonts']} train / {summary['heldout_fonts']} "
          f"held-out fonts, text from {summary['corpus']}")
    return 0


def _cmd_instruct(a) -> int:
    return instruct_main(a.rest)


COMMANDS = {"instruct": _cmd_instruct, "shard": _cmd_shard, "llava": _cmd_llava, "verify": _cmd_verify, "synth-text": _cmd_synth, "import": _cmd_import,
            "train-spm": _cmd_spm, "demo": _cmd_demo}


def _main(argv: list[str]) -> int:
    if argv[:1] == ["instruct"]:  # its own parser: forward everything after the sub-command name
        return _cmd_instruct(argparse.Namespace(rest=argv[1:]))
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "resume", False) and getattr(args, "overwrite", False):
            raise UsageError("--resume and --overwrite exclude each other")
        return COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)

"""Inference: ``python -m ett_ds.infer {caption,chat,generate,reconstruct} --ckpt PATH ...``.

--ckpt is a training step folder, a run folder (its newest complete checkpoint) or an export folder.

    caption     --image FILE [FILE ...] [--prompt TEXT]      one line per image: FILE<TAB>caption (tab, newline and
                                                             backslash in a caption written \\t \\n \\\\); an empty
                                                             caption (the model ended at once) is counted on stderr
    chat        --image FILE                                 user turns from stdin (one per line), replies on stdout;
                                                             the image is encoded once, the KV cache kept between turns
    generate    --prompt TEXT [--prompt TEXT ...] --out FILE.png [--num-images N --cfg-scale S ...]
                one image writes FILE.png, more write FILE_0.png, FILE_1.png ... (prompt-major)
    reconstruct --image FILE [FILE ...] --out FILE.png       the tokenizer's round trip at the configured size

Sampling flags left out take the checkpoint config's ``sampling`` section (docs/configuration.md): captions and chat
its ``temperature``, ``top_k``, ``top_p`` and ``caption_max_new_tokens`` / ``chat_max_new_tokens``; generate its
``cfg_scale``, ``t2i_temperature``, ``t2i_top_k``, ``t2i_top_p``. A flag overrides the config.

Errors (missing file, unreadable image, a checkpoint of the wrong kind) are one ``error: ...`` line, exit code 2
(``commandline.run_cli``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .commandline import OneLineParser, UserError, run_cli
from .config import SamplingConfig
from .data.transforms import image_to_tensor
from .eval.metrics import to_uint8_images
from .generation import ChatSession, caption, generate_images, reconstruct
from .models.loading import DTYPES, load_model, read_config, resolve


class CLIError(UserError):
    """A bad argument or input of ``python -m ett_ds.infer``: one line, exit code 2."""


# per command: flag (argparse dest) -> the key of the checkpoint config's `sampling` section that is its default
SAMPLING_DEFAULTS = {
    "caption": {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "max_new_tokens": "caption_max_new_tokens"},
    "chat": {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "max_new_tokens": "chat_max_new_tokens"},
    "generate": {"temperature": "t2i_temperature", "top_k": "t2i_top_k", "top_p": "t2i_top_p",
                 "cfg_scale": "cfg_scale"},
}


def sampling_of(args, cfg) -> SamplingConfig:
    """The checkpoint config's ``sampling`` settings with every sampling flag given (not None) in their place."""
    keys = SAMPLING_DEFAULTS.get(args.command, {})
    return cfg.sampling.with_overrides(**{key: getattr(args, dest) for dest, key in keys.items()})


def caption_field(text: str) -> str:
    """A caption as one TSV field: backslash, tab and newline escaped (``\\\\``, ``\\t``, ``\\n``)."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def parse_args(argv):
    ap = OneLineParser(prog="python -m ett_ds.infer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, command: str | None):
        p.add_argument("--ckpt", required=True, help="step folder, run folder or export folder")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="weights of the LLM and heads (the vision tokenizer stays float32)")
        if command is not None:  # None: every sampling flag defaults to the checkpoint config's sampling.KEY
            key = SAMPLING_DEFAULTS[command]
            p.add_argument("--temperature", type=float, default=None,
                           help=f"0 = greedy (default: the checkpoint's sampling.{key['temperature']})")
            p.add_argument("--top-k", type=int, default=None,
                           help=f"0 = off (default: the checkpoint's sampling.{key['top_k']})")
            p.add_argument("--top-p", type=float, default=None,
                           help=f"1 = off (default: the checkpoint's sampling.{key['top_p']})")
            p.add_argument("--seed", type=int, default=0)

    for name in ("caption", "chat"):
        p = sub.add_parser(name, help=f"{name} about an image")
        common(p, name)
        p.add_argument("--image", nargs="+" if name == "caption" else None, required=True)
        if name == "caption":
            p.add_argument("--prompt", default=None, help="default: the config's first caption prompt")
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help=f"longest {'caption' if name == 'caption' else 'reply'} in tokens (default: the "
                            f"checkpoint's sampling.{name}_max_new_tokens)")
    p = sub.add_parser("generate", help="text to image")
    common(p, "generate")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", required=True, help="FILE.png")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance; <= 0 turns it off (default: the checkpoint's sampling.cfg_scale)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p = sub.add_parser("reconstruct", help="tokenizer round trip")
    common(p, None)
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--out", required=True, help="FILE.png")
    return ap.parse_args(argv)


def read_images(paths: list[str], size: tuple[int, int], mode: str = "crop") -> torch.Tensor:
    """Images fitted to ``size`` = (H, W) like the training data (``data.resize_mode`` ``mode``), [-1, 1]."""
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise CLIError(f"image not found: {p}")
        try:
            with Image.open(p) as img:
                img.load()
                out.append(image_to_tensor(img, size=size, train=False, mode=mode))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise CLIError(f"cannot read image {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
    return torch.stack(out)


def out_paths(out: str, n: int) -> list[Path]:
    base = Path(out)
    if base.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file name, got {out}")
    try:  # fail before any model work when the output cannot be written
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise CLIError(f"cannot create the output folder {base.parent}") from None
    if not os.access(base.parent, os.W_OK):
        raise CLIError(f"output folder {base.parent} is not writable")
    if n == 1:
        return [base]
    return [base.with_name(f"{base.stem}_{i}{base.suffix}") for i in range(n)]


def write_pngs(images: torch.Tensor, paths: list[Path]) -> None:
    for arr, path in zip(to_uint8_images(images), paths):
        try:
            Image.fromarray(arr, mode="RGB").save(path, format="PNG")
        except OSError as e:
            raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
        print(path, flush=True)


def run(args) -> None:
    cfg = read_config(*resolve(args.ckpt))  # a missing or foreign --ckpt fails before images are decoded
    settings = sampling_of(args, cfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.command == "generate":
        if args.num_images < 1:
            raise CLIError("--num-images must be >= 1")
        paths = out_paths(args.out, len(args.prompt) * args.num_images)
        loaded = load_model(args.ckpt, device, DTYPES[args.dtype], require="generate")
        images = generate_images(loaded.model, loaded.text, args.prompt, **settings.t2i(), seed=args.seed,
                                 num_images=args.num_images)
        write_pngs(images, paths)
        return
    pixels = read_images(args.image if isinstance(args.image, list) else [args.image], tuple(cfg.data.image_size),
                         cfg.data.resize_mode)
    if args.command == "reconstruct":
        paths = out_paths(args.out, len(pixels))
        loaded = load_model(args.ckpt, device, DTYPES[args.dtype])
        write_pngs(reconstruct(loaded.model, pixels), paths)
        return
    loaded = load_model(args.ckpt, device, DTYPES[args.dtype], require="llm")
    g = torch.Generator(device=device).manual_seed(args.seed)
    longest = settings.caption_max_new_tokens if args.command == "caption" else settings.chat_max_new_tokens
    sampling = dict(max_new_tokens=longest, temperature=settings.temperature, top_k=settings.top_k,
                    top_p=settings.top_p, generator=g)
    if args.command == "caption":
        texts = caption(loaded.model, loaded.text, pixels, prompt=args.prompt, **sampling)
        for path, text in zip(args.image, texts):
            print(f"{path}\t{caption_field(text)}", flush=True)
        empty = sum(not t.strip() for t in texts)
        if empty:
            print(f"note: {empty} of {len(texts)} captions are empty (the model ended its answer at once)",
                  file=sys.stderr)
        return
    session = ChatSession(loaded.model, loaded.text, pixels)  # the KV cache carries over from turn to turn
    for line in sys.stdin:
        message = line.rstrip("\n")
        if message.strip():
            print(session.reply(message, **sampling), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda a: run(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())

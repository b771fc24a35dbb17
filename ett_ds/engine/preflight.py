"""Check a recipe and its overrides before a job starts, and say what the job will run.

``python -m ett_ds.engine.preflight --world-size N --config RECIPE [key=value ...]`` loads the config exactly as
``ett_ds.train`` does (unknown keys such as ``train.max_step=5`` and bad values are one-line errors, exit 2), resolves
the gradient accumulation for N data-parallel ranks (``train.global_batch_size`` must be a multiple of
micro-batch x ranks) and prints one line::

    plan: stage=ett world_size=16 micro_batch=4 accumulation=2 global_batch=128 max_steps=1000 run_dir=runs/ett

It also checks every local path the run will read (:func:`missing_inputs`: the LLM folder, the text tokenizer,
the training and (with ``train.eval_every``) held-out shards, ``train.init_from``, ``train.resume``, the tokenizer
checkpoint and its YAML, the VGG weights, a ``engine.ds_config`` file) and names each one that is missing.

``launchers/train.sh`` runs it before every launch (and in ``--dry-run``), so a typo fails on the submitting node in a
second instead of on every node after the allocation started; ``ett_ds.train`` runs the path check too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import config as C
from ..checkpoint.layout import step_folder
from ..commandline import UserError, run_cli
from ..data.decode import is_url
from ..data.shards import expand_urls
from ..models.ett import STAGE_SPECS
from .deepspeed import grad_accum_steps


def missing_inputs(cfg: C.Config) -> list[str]:
    """One ``key: what is missing`` per local path the run would read and cannot. URLs and ``pipe:`` shards are left
    alone, and so is what the run builds itself: the demo data under a ``data.demo_dir`` not built yet."""
    spec, out = STAGE_SPECS[cfg.stage], []
    demo = Path(cfg.data.demo_dir).absolute() if cfg.data.demo_dir else None
    demo_built = demo is not None and (demo / "demo_manifest.json").is_file()

    def pending(path: str) -> bool:  # built with the demo data before the run reads it
        p = Path(path).expanduser().absolute()
        return demo is not None and not demo_built and (p == demo or demo in p.parents)

    def need(key: str, path: str | None, kind: str = "exists") -> None:
        if not path or is_url(path) or pending(path):
            return
        p = Path(path).expanduser()
        if not p.exists():
            out.append(f"{key}: {path} does not exist")
        elif kind == "dir" and not p.is_dir():
            out.append(f"{key}: {path} is not a folder")
        elif kind == "llm" and not (p / "config.json").is_file():
            out.append(f"{key}: {path} has no config.json (not a Hugging Face model folder)")
        elif kind == "step" and step_folder(p) is None:
            out.append(f"{key}: {path} is neither a complete checkpoint step folder (no `complete` marker) nor a "
                       "run folder with one")

    def shards(key: str, urls: str) -> None:
        specs = [u for u in urls.split("::") if u.strip() and not pending(u.strip())]
        try:
            if specs:
                expand_urls("::".join(specs))
        except FileNotFoundError as e:
            beside = f" (beside the built demo data in {demo}, which is never rebuilt)" if demo_built else ""
            out.append(f"{key}: {e}{beside}")

    shards("data.train", cfg.data.train)
    if cfg.train.eval_every and cfg.data.eval:
        shards("data.eval", cfg.data.eval)
    if spec.uses_llm:
        need("model.llm.path", cfg.model.llm.path, "llm")
        need("model.llm.text_tokenizer", cfg.model.llm.text_tokenizer)
    need("model.tokenizer.checkpoint", cfg.model.tokenizer.checkpoint)
    need("model.tokenizer.checkpoint_config", cfg.model.tokenizer.checkpoint_config)
    if spec.reconstruct:
        need("loss.perceptual_weights", cfg.loss.perceptual_weights)
    need("train.init_from", cfg.train.init_from, "step")
    if cfg.train.resume not in ("auto", "never", ""):
        need("train.resume", cfg.train.resume, "dir")
    if Path(cfg.engine.ds_config).suffix:  # a file of one's own, not a template name
        need("engine.ds_config", cfg.engine.ds_config)
    return out


def check_inputs(cfg: C.Config) -> None:
    """A one-line FileNotFoundError naming every missing input (see :func:`missing_inputs`)."""
    missing = missing_inputs(cfg)
    if missing:
        raise FileNotFoundError("missing input" + "s" * (len(missing) > 1) + ": " + "; ".join(missing))


def pin_init_from(cfg: C.Config) -> None:
    """``train.init_from`` may name a run folder (as every ``--ckpt`` may): pin it to that run's newest complete step
    now, so that every rank loads the same step and the run's config.yaml records which one."""
    given = cfg.train.init_from
    if not given:
        return
    step = step_folder(Path(given).expanduser())
    if step is not None and step != Path(given).expanduser():
        cfg.train.init_from = str(step)
        if os.environ.get("RANK", "0") == "0":
            print(f"[ett_ds] train.init_from {given}: its newest complete step, {step}", flush=True)


def plan(cfg: C.Config, world_size: int) -> dict:
    accum = grad_accum_steps(cfg, world_size)
    micro = cfg.train.micro_batch_size
    return {"stage": cfg.stage, "world_size": world_size, "micro_batch": micro, "accumulation": accum,
            "global_batch": micro * accum * world_size, "max_steps": cfg.train.max_steps, "run_dir": str(cfg.run_dir)}


def plan_line(p: dict) -> str:
    return "plan: " + " ".join(f"{k}={v}" for k, v in p.items())


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ett_ds.engine.preflight", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, required=True, help="data-parallel ranks the job will have")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        raise UserError("--world-size must be >= 1")
    cfg = C.load_config(args.config, args.overrides)
    check_inputs(cfg)
    print(plan_line(plan(cfg, args.world_size)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

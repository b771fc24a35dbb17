"""Check a recipe and its overrides before a job starts, and say what the job will run.

``python -m ett_ds.engine.preflight --world-size N --config RECIPE [key=value ...]`` loads the config exactly as
``ett_ds.train`` does (unknown keys such as ``train.max_step=5`` and bad values are one-line errors, exit 2), resolves
the gradient accumulation for N data-parallel ranks (``train.global_batch_size`` must be a multiple of
micro-batch x ranks) and prints one line::

    plan: stage=ett world_size=16 micro_batch=4 accumulation=2 global_batch=128 max_steps=1000 run_dir=runs/ett

``launchers/train.sh`` runs it before every launch (and in ``--dry-run``), so a typo fails on the submitting node in a
second instead of on every node after the allocation started.
"""
from __future__ import annotations

import argparse
import sys

from .. import config as C


def plan(cfg: C.Config, world_size: int) -> dict:
    from .deepspeed import grad_accum_steps
    accum = grad_accum_steps(cfg, world_size)
    micro = cfg.train.micro_batch_size
    return {"stage": cfg.stage, "world_size": world_size, "micro_batch": micro, "accumulation": accum,
            "global_batch": micro * accum * world_size, "max_steps": cfg.train.max_steps, "run_dir": str(cfg.run_dir)}


def plan_line(p: dict) -> str:
    return "plan: " + " ".join(f"{k}={v}" for k, v in p.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ett_ds.engine.preflight", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, required=True, help="data-parallel ranks the job will have")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        print("error: --world-size must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = C.load_config(args.config, args.overrides)
        print(plan_line(plan(cfg, args.world_size)))
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

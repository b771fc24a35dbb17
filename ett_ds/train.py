"""Training entry point: ``python -m ett_ds.train --config RECIPE [key=value ...]``.

Also started by the ``deepspeed`` launcher (``--local_rank``) and by ``torchrun``. It loads the config, checks the
inputs, runs ``trainer.Trainer`` and turns expected failures into one line and exit code 2 (75: preempted, requeue).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import checkpoint as ckpt
from . import config as C
from .checkpoint import CheckpointError
from .data.decode import DataErrorRateExceeded
from .engine import dist, preempt, preflight
from .trainer import Trainer, TrainingDiverged

KEYS_EPILOG = """\
keys: every key.sub=value a recipe or override can set, with type, default, allowed values and meaning, is in
  docs/configuration.md (or: python -m ett_ds.config --markdown); the resolved config of a recipe
  and overrides: python -m ett_ds.config RECIPE key.sub=value ...
recipes: tiny (the built-in demo data, built on first use), own (your shards: needs data.train=SHARDS; walkthrough
  in docs/own_data.md), qwen2.5-1.5b-ibq (the paper's setting); stages and chaining: docs/stages.md."""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m ett_ds.train", description=__doc__, epilog=KEYS_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML (or a built-in name: tiny, own, qwen2.5-1.5b-ibq)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stage=ett train.max_steps=100")
    return ap.parse_args(argv)


def one_line(e: BaseException) -> str:
    """An expected error as one line. A DataLoader worker's error arrives wrapped ("Caught X in DataLoader worker
    process 0." + the worker's traceback): its last line, without the exception's module path, is the message."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) > 1 and lines[0].startswith("Caught "):
        name, sep, msg = lines[-1].partition(": ")
        return msg if sep and "." in name and " " not in name else lines[-1]
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = C.load_config(args.config, args.overrides)
        preflight.check_inputs(cfg)  # every local path the run reads, before anything is built or written
        preflight.pin_init_from(cfg)  # a run folder -> its newest complete step, recorded as such in config.yaml
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.init_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg)
        last = trainer.fit()
    except (C.ConfigError, CheckpointError, ckpt.ResumeError, FileNotFoundError, TrainingDiverged,
            DataErrorRateExceeded, FloatingPointError) as e:
        if os.environ.get("ETT_DEBUG") == "1":
            raise
        if trainer is not None:
            trainer.log.close()  # ends the progress bar's line first
        print(f"error: {one_line(e)} (ETT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    if dist.is_rank0() and last:
        print(json.dumps({"final": last}))
    if dist.world_size() > 1:
        dist.shutdown()
    return preempt.REQUEUE_EXIT if trainer.preempted else 0


if __name__ == "__main__":
    preempt.install()  # SLURM's USR1 (time limit) / TERM (preemption): checkpoint at the next step, exit 75
    sys.exit(main())

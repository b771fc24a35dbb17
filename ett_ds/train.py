"""Training entry point: ``python -m ett_ds.train --config RECIPE [key=value ...]``.

Also started by the ``deepspeed`` launcher (``--local_rank``) and by ``torchrun``. It loads the config, checks the
inputs, runs ``trainer.Trainer``; ``commandline.run_cli`` turns expected failures (a ``UserError``, a missing file,
a diverged run) into one line and exit code 2; 75: preempted, requeue.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import config as C
from . import preflight
from .commandline import DEBUG_ENV, OneLineParser, run_cli
from .engine import dist, preempt
from .trainer import Trainer, TrainingDiverged

KEYS_EPILOG = """\
keys: every key.sub=value a recipe or override can set, with type, default, allowed values and meaning, is in
  docs/configuration.md (or: python -m ett_ds.config --markdown); the resolved config of a recipe
  and overrides: python -m ett_ds.config RECIPE key.sub=value ...
recipes: tiny (the built-in demo data, built on first use), own (your shards: needs data.train=SHARDS; walkthrough
  in docs/own_data.md), qwen2.5-1.5b-ibq (the paper's setting); stages and chaining: docs/stages.md."""


def parse_args(argv):
    ap = OneLineParser(prog="python -m ett_ds.train", description=__doc__, epilog=KEYS_EPILOG)
    ap.add_argument("--config", required=True, help="recipe YAML (or a built-in name: tiny, own, qwen2.5-1.5b-ibq)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stage=ett train.max_steps=100")
    return ap.parse_args(argv)


class _Job:
    """One training job in the two steps :func:`main` runs through :func:`run_cli`: ``prepare`` (the config and
    every input, before anything is built or written) and ``fit`` (after the process group is up)."""

    def __init__(self):
        self.cfg, self.trainer, self.last = None, None, None

    def prepare(self, argv: list[str]) -> None:
        args = parse_args(argv)
        self.cfg = C.load_config(args.config, args.overrides)
        preflight.check_inputs(self.cfg)  # every local path the run reads, before anything is built or written

    def fit(self, _argv) -> None:
        self.trainer = Trainer(self.cfg)
        self.last = self.trainer.fit()

    def close_log(self, _e) -> None:
        if self.trainer is not None:
            self.trainer.log.close()  # ends the progress bar's line first


def main(argv: list[str] | None = None) -> int:
    """0 done, 2 a user error (one line; ETT_DEBUG=1 re-raises), 75 preempted (checkpointed: requeue)."""
    job = _Job()
    code = run_cli(job.prepare, argv)
    if code:
        return code
    dist.init_distributed()
    code = run_cli(job.fit, [], also=(TrainingDiverged, FloatingPointError), on_error=job.close_log,
                   hint=f" ({DEBUG_ENV}=1 shows the traceback)")
    if code:
        return code
    if dist.is_rank0() and job.last:
        print(json.dumps({"final": job.last}))
    if dist.world_size() > 1:
        dist.shutdown()
    return preempt.REQUEUE_EXIT if job.trainer.preempted else 0


if __name__ == "__main__":
    preempt.install()  # SLURM's USR1 (time limit) / TERM (preemption): checkpoint at the next step, exit 75
    sys.exit(main())

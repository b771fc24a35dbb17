"""Check a recipe and its overrides before a job starts, and say what the job will run.

``python -m ett_ds.preflight --world-size N --config RECIPE [key=value ...]`` loads the config exactly as
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

import os
import shutil
import sys
from pathlib import Path

import yaml

from data_tools.cli import main as data_tools_main
from data_tools.errors import UsageError
from data_tools.spm import spm_from_shards

from . import checkpoint as ckpt
from . import config as C
from .checkpoint import training
from .checkpoint.layout import step_folder
from .commandline import OneLineParser, UserError, run_cli
from .data.decode import is_url
from .data.shards import expand_urls
from .data.text import MISSING_HINT, RUN_SPM, SPECIALS
from .engine import dist
from .engine.deepspeed import grad_accum_steps
from .stages import STAGE_SPECS


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


# -- what a run makes or checks before its first step (the Trainer calls these) -----------------------------
def ensure_demo_data(cfg: C.Config) -> None:
    """Build the built-in demo data (rank 0, others wait) when the recipe asks for it and it is missing.

    Only into a folder that is absent or holds no ``demo_manifest.json`` (an interrupted build): a finished demo
    folder is never rebuilt (a rebuild makes a new ``spm.model`` and may pick other fonts, which breaks the
    checkpoints trained on it), so a ``data.train`` that matches nothing beside one is an error."""
    if not cfg.data.demo_dir or _has_shards(cfg.data.train):
        return
    demo = Path(cfg.data.demo_dir)
    if (demo / "demo_manifest.json").is_file():
        raise FileNotFoundError(
            f"data.train={cfg.data.train} matches no shards, and {demo} already holds built demo data, which is "
            f"never rebuilt: point data.train at its shards ({demo}/train) or delete {demo} to rebuild it")
    if dist.is_rank0():
        if data_tools_main(["demo", "--out", cfg.data.demo_dir]) != 0:
            raise FileNotFoundError(f"could not build the demo data in {cfg.data.demo_dir}")
    dist.barrier()


def _has_shards(urls: str) -> bool:
    try:
        return bool(expand_urls(urls))
    except (FileNotFoundError, ValueError):
        return False


def check_shards_and_resume(cfg: C.Config) -> None:
    """Fail (one line) before anything is written when the training shards or the checkpoint to resume from are
    missing, or the checkpoint does not hold the shards of the world size it records."""
    expand_urls(cfg.data.train)  # FileNotFoundError naming what is missing
    if cfg.train.eval_every and cfg.data.eval:
        expand_urls(cfg.data.eval)
    folder = training.resume_folder(cfg)
    if folder is not None:
        if not folder.is_dir():
            raise ckpt.ResumeError(f"train.resume={folder}: no such checkpoint folder")
        ckpt.check_world_size(folder, ckpt.read_trainer_state(folder))


def ensure_text_tokenizer(cfg: C.Config) -> None:
    """Give a run whose LLM has no tokenizer one, and record it in ``cfg`` (so config.yaml, every checkpoint, resume,
    ``evaluate``, ``infer`` and ``export`` find it). Rank 0 works, the others wait.

    Only for a stage with an LLM built from ``model.llm.init_config`` (no ``path``) and no
    ``model.llm.text_tokenizer``: the run folder's ``spm.model`` when it has one (a resumed or repeated run); else
    the one ``train.init_from``'s run recorded (copied in: stage 1 -> 2 -> 3 keep the ids their LLM learnt); else a
    new sentencepiece model trained from ``data.train``'s captions (at most 200,000; up to
    ``init_config.vocab_size`` - 3 pieces, the 3 image tokens completing the LLM's table). A ``text_tokenizer``
    that is set and missing is a one-line error saying where tokenizers come from."""
    llm = cfg.model.llm
    if not STAGE_SPECS[cfg.stage].uses_llm:
        return
    if llm.text_tokenizer:
        p = Path(llm.text_tokenizer)
        if p.exists():
            return
        demo = Path(cfg.data.demo_dir).absolute() if cfg.data.demo_dir else None
        if demo is not None and demo in p.absolute().parents:
            raise FileNotFoundError(
                f"model.llm.text_tokenizer: {p} not found: it comes with the demo data in {cfg.data.demo_dir}, which "
                f"is built only when data.train is the demo's; for your own data use --config own (it trains a "
                f"tokenizer from data.train's captions), see docs/own_data.md")
        raise FileNotFoundError(f"model.llm.text_tokenizer: {p} not found ({MISSING_HINT})")
    if llm.path or not llm.init_config:
        return  # the LLM folder's own tokenizer
    target = cfg.run_dir / RUN_SPM
    if not target.is_file():
        error = None
        if dist.is_rank0():
            try:
                _make_run_spm(cfg, target)
            except (OSError, ValueError) as e:
                error = str(e)
        dist.barrier()
        if not target.is_file():
            raise FileNotFoundError(error or f"model.llm.text_tokenizer: rank 0 could not make {target}")
    llm.text_tokenizer = str(target)


def _make_run_spm(cfg, target: Path) -> None:
    """Rank 0: ``target`` copied from ``train.init_from``'s run, or trained from ``data.train``'s captions."""
    inherited = _recorded_text_tokenizer(Path(cfg.train.init_from)) if cfg.train.init_from else None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{RUN_SPM}.tmp")
    if inherited is not None:
        shutil.copyfile(inherited, tmp)
        tmp.replace(target)
        print(f"[ett_ds] text tokenizer of train.init_from's run: {inherited} -> {target}", flush=True)
        return
    vocab = int(cfg.model.llm.init_config.get("vocab_size", 1000)) - len(SPECIALS)
    prefix = target.with_name(".spm_training")
    try:
        made = spm_from_shards(cfg.data.train, str(prefix), vocab_size=vocab)
    except UsageError as e:
        raise ValueError(f"model.llm.text_tokenizer is unset and none could be trained: {e}") from None
    Path(made["model"]).replace(target)
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    print(f"[ett_ds] trained a sentencepiece text tokenizer ({made['vocab_size']} pieces, from {made['sentences']} "
          f"captions of data.train) -> {target}", flush=True)


def _recorded_text_tokenizer(step_folder: Path) -> Path | None:
    """The text tokenizer the run of checkpoint ``step_folder`` trained with (its config.yaml), if it still exists."""
    f = step_folder / "config.yaml"
    if not f.is_file():
        return None
    try:
        recorded = ((yaml.safe_load(f.read_text()) or {}).get("model") or {}).get("llm", {}).get("text_tokenizer")
    except (yaml.YAMLError, AttributeError):
        return None
    if not recorded:
        return None
    for candidate in (Path(recorded), step_folder.parent.parent / RUN_SPM):
        if candidate.is_file() and candidate.suffix == ".model":
            return candidate
    return None


def plan(cfg: C.Config, world_size: int) -> dict:
    accum = grad_accum_steps(cfg, world_size)
    micro = cfg.train.micro_batch_size
    return {"stage": cfg.stage, "world_size": world_size, "micro_batch": micro, "accumulation": accum,
            "global_batch": micro * accum * world_size, "max_steps": cfg.train.max_steps, "run_dir": str(cfg.run_dir)}


def plan_line(p: dict) -> str:
    return "plan: " + " ".join(f"{k}={v}" for k, v in p.items())


def _main(argv: list[str]) -> int:
    ap = OneLineParser(prog="python -m ett_ds.preflight", description=__doc__)
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

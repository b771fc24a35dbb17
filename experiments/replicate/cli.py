"""The paper's Tab. 4/5 ablation with seeds and intervals: ``python -m experiments.replicate --size small --out DIR``.

1. data: train / val / held-out splits (``experiments/replicate/data.py``: held out by font family and by string);
2. stage 0: one tokenizer trained for reconstruction until the validation PSNR gains < ``--stage0-tol`` dB per
   1,000 steps (constant lr, checked every ``--stage0-chunk`` steps; capped at ``--steps0-max``), then
   ``--cooldown`` steps with the lr decaying to 0; shared by all arms;
3. text pretraining of the LLM (``--text-pretrain``, on by default for ``small``; ``textlm.py``), loaded by the ``text_*`` arms
   through ``model.llm.path``; ``--text-corpus lookback`` (default) is text whose caption is read off earlier tokens
   (in-context skills, issue 23), ``captions`` the caption prior alone (issue 16);
   with ``--stage1-curve S1,S2,..`` the first seed's stage-1 runs (projector only, LLM frozen: random and text LLM)
   are evaluated on the held-out split after S1, S2, ... steps (``--stop-after stage1`` stops there);
4. optional grid (``--grid-alphas`` x ``--grid-ratios``, tokenizer lr = ratio x LLM lr) at the first seed,
   evaluated on the validation split; the setting with the best validation EM among those that keep validation
   ΔPSNR >= ``--max-psnr-drop`` below zero is chosen (else ``--alpha``/``--ratio``);
5. the reported arms at every seed (``--seeds N``; seed = the top-level ``seed=``, which sets stage 1-2 init and
   data order): frozen, understanding-only, ETT at the chosen setting, ETT at ``--paper-alpha`` (same ratio),
   and with ``--text-pretrain`` frozen and chosen ETT on the text-pretrained LLM; evaluated on the held-out split;
6. ``DIR/results.md``, ``results.json``, ``em_vs_dpsnr.png``, ``stage0_curve.png`` (``report.py``).

A rerun with the same ``--out`` reuses finished stages and evaluations, and refuses a stage trained otherwise.
ETT arms log ``code_drift`` and ``grad_ratio`` per step when the trainer has ``train.log_tokenizer_dynamics``.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from data_tools.errors import UsageError

from . import arms as A
from . import data as D
from .stages import Stages, has_train_option, log, step_folder, train_curve

SIZES = {
    "tiny": dict(image="16x32", digits="3-3", num_train=64, num_val=16, num_heldout=16, spm_vocab=300, batch=4,
                 stage0_chunk=2, stage0_window=2, steps0_max=4, cooldown=2, steps1=2, steps2=3, text_steps=3,
                 loader_workers=0,
                 model=["model.tokenizer.attn_resolutions=[4]", "model.llm.init_config.num_hidden_layers=2",
                        "model.llm.init_config.hidden_size=64", "model.llm.init_config.intermediate_size=128",
                        "engine.persistence_threshold=0"]),
    # small: data_tools' numbers demo task (3 digits, 32x64, 32 visual tokens), the tiny recipe's model, and the
    # setting bench/REPLICATION.md (2026-12-06) supports: a look-back text LLM, frozen against ETT alpha 1 and the
    # paper's 0.25 at the paper's lr relation (0.8x), understanding-only beside, random-LLM frozen, 3 seeds
    "small": dict(image="32x64", digits="3-3", num_train=4000, num_val=128, num_heldout=128, spm_vocab=512,
                  batch=16, stage0_chunk=500, stage0_window=1000, steps0_max=1000, cooldown=200, steps1=600,
                  steps2=400, text_steps=2500, loader_workers=1, model=[],
                  flags=dict(seeds=3, text_pretrain=True, text_full=True, random_arms="frozen", stage1_lr=2e-3)),
    "gpu": dict(image="32x64", digits="3-5", num_train=60000, num_val=512, num_heldout=512, spm_vocab=512, batch=64,
                stage0_chunk=1000, stage0_window=1000, steps0_max=30000, cooldown=3000, steps1=500, steps2=1500,
                text_steps=3000, loader_workers=4,
                model=["model.tokenizer.ch=64", "model.tokenizer.num_res_blocks=2", "model.tokenizer.code_dim=64",
                       "model.tokenizer.codebook_size=4096", "model.llm.init_config.hidden_size=512",
                       "model.llm.init_config.intermediate_size=1536", "model.llm.init_config.num_hidden_layers=8",
                       "model.llm.init_config.num_attention_heads=8", "model.llm.init_config.num_key_value_heads=4"]),
}
# flags whose default depends on --size (a size's "flags" entry wins over these)
FLAG_DEFAULTS = dict(seeds=1, text_pretrain=False, text_full=False, random_arms="all", stage1_lr=None)
STOPS = ("data", "stage0", "stage1", "grid", "final")


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    try:
        return sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, got {text!r}") from None


def cells(text: str) -> list[tuple[float, float]]:
    try:
        return [(float(a), float(r)) for a, r in (c.split(":") for c in text.split(",") if c.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA:RATIO,..., got {text!r}") from None


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m experiments.replicate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default="tiny", help="base recipe; the size's overrides go on top")
    ap.add_argument("--task", choices=("numbers", "words"), default="numbers", help="data_tools demo task")
    ap.add_argument("--image", default=None, help="HxW (default: the size's)")
    ap.add_argument("--digits", default=None, help="LO-HI digits per number (task numbers)")
    for k in ("num_train", "num_val", "num_heldout", "spm_vocab", "batch", "stage0_chunk", "steps0_max", "cooldown",
              "steps1", "steps2", "text_steps"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="default: the size's")
    ap.add_argument("--stage0-tol", type=float, default=0.1, help="stop stage 0 below this PSNR gain (dB) per 1k steps")
    ap.add_argument("--stage0-lr", type=float, default=2e-3, help="tokenizer lr in stage 0 (constant after warm-up)")
    ap.add_argument("--lr", type=float, default=1e-3, help="LLM/projector peak lr (stages 1-2)")
    ap.add_argument("--alpha", type=float, default=1.0,
                    help="ETT alpha when no grid chooses one (bench/REPLICATION.md 2026-12-06: alpha 1 at 0.8x kept "
                         "-0.2 dB with +44 points on the text LLM; issue 16's 0.1 at 0.03x gained nothing over 5 seeds)")
    ap.add_argument("--ratio", type=float, default=0.8,
                    help="stage-2 tokenizer lr / LLM lr when no grid chooses (0.8: the paper's 0.4x of the stage-0 lr, "
                         "2e-3, against the LLM's 1e-3)")
    ap.add_argument("--paper-alpha", type=float, default=0.25, help="reported beside the chosen alpha")
    ap.add_argument("--grid-alphas", type=floats, default=[], help="e.g. 0.01,0.05,0.1,0.25")
    ap.add_argument("--grid-ratios", type=floats, default=[], help="e.g. 0.03,0.1,0.3,1")
    ap.add_argument("--refine", type=cells, default=[], help="extra grid cells ALPHA:RATIO,... (where it pays)")
    ap.add_argument("--und-ratios", type=floats, default=[],
                    help="understanding-only arms at these ratios too (default: only the chosen ratio)")
    ap.add_argument("--report-cells", type=cells, default=[],
                    help="ETT settings ALPHA:RATIO,... reported at every seed beside the chosen one")
    ap.add_argument("--max-psnr-drop", type=float, default=0.3, help="selection: validation ΔPSNR >= -this (dB)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per reported arm (stage 0 shared; small: 3, else 1)")
    ap.add_argument("--seed", type=int, default=0, help="first seed; also stage 0's and the data's")
    ap.add_argument("--index", action="store_true", help="also the index arm (codes through a free embedding)")
    ap.add_argument("--text-pretrain", action=argparse.BooleanOptionalAction, default=None,
                    help="also the text-pretrained LLM arms (default: on for small)")
    ap.add_argument("--text-lr", type=float, default=1e-3)
    ap.add_argument("--text-corpus", choices=("lookback", "captions"), default="lookback",
                    help="text pretraining corpus (textlm.py): look-back sequences, or the caption prior alone")
    ap.add_argument("--text-noise", type=float, default=0.5, help="lookback: noise scale on the image-slot embeddings")
    ap.add_argument("--text-full", action=argparse.BooleanOptionalAction, default=None,
                    help="the text-pretrained LLM gets every arm the random LLM gets (else frozen and chosen ETT; "
                         "default: on for small)")
    ap.add_argument("--random-arms", choices=("all", "frozen"), default=None,
                    help="frozen: of the random-LLM arms only frozen (with --text-full, for time; default: frozen for "
                         "small, else all)")
    ap.add_argument("--stage1-lr", type=float, default=None,
                    help="projector lr of stage 1 (default: 2e-3 for small, else --lr)")
    ap.add_argument("--stage1-text-only", action="store_true",
                    help="the stage-1 curve of the text-pretrained LLM only (skip the random-LLM control, for time)")
    ap.add_argument("--stage1-curve", type=ints, default=[],
                    help="evaluate the first seed's stage-1 runs on held-out after these steps (max <= --steps1)")
    ap.add_argument("--allow-shared-family", action="store_true",
                    help="accept validation/held-out fonts of the training type family (when neither held-out "
                         f"collection, {' nor '.join(D.HELDOUT_PACKAGES.values())}, is installed); without it that is "
                         "an error")
    ap.add_argument("--gan", action="store_true", help="keep the GAN term (default off: L_vq = L1 + quant + entropy)")
    ap.add_argument("--launcher", default="inprocess", help="inprocess | python | a command such as launchers/train.sh")
    ap.add_argument("--workers", type=int, default=1, help="data_tools processes")
    ap.add_argument("--stop-after", choices=STOPS, default="final", help="stop after this phase")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every stage")
    args = ap.parse_args(argv)
    for k, v in {**FLAG_DEFAULTS, **SIZES[args.size].get("flags", {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if bool(args.grid_alphas) != bool(args.grid_ratios) or (args.refine and not args.grid_alphas):
        ap.error("--grid-alphas and --grid-ratios go together (and --refine adds to them)")
    o = dict(SIZES[args.size])
    for k in ("image", "digits", *(k for k in o if k not in ("model", "stage0_window", "loader_workers", "flags"))):
        if getattr(args, k, None) is not None:
            o[k] = getattr(args, k)
    try:
        lo, hi = (int(v) for v in str(o["digits"]).split("-"))
        h, w = (int(v) for v in o["image"].split("x"))
    except ValueError:
        ap.error(f"--digits takes LO-HI and --image HxW, got {o['digits']!r} and {o['image']!r}")
    o["digits"] = (lo, hi)
    if args.stage1_curve and (args.stage1_curve[0] < 1 or args.stage1_curve[-1] > o["steps1"]):
        ap.error(f"--stage1-curve steps must lie in 1..--steps1 ({o['steps1']})")
    args.opts = o
    return args


def common_overrides(args, root: Path, runs: Path) -> list[str]:
    o = args.opts
    h, w = o["image"].split("x")
    ov = [f"out_dir={runs}", f"data.train={root / 'train'}", f"data.eval={root / 'val'}",
          f"model.llm.text_tokenizer={root / 'spm.model'}", "data.demo_dir=null", f"data.image_size=[{h},{w}]",
          f"train.micro_batch_size={o['batch']}", "train.image_every=0", "train.save_every=1000000",
          "train.keep_last=1", "train.log_every=10", f"data.num_workers={o['loader_workers']}",
          "optim.warmup_ratio=0.05", f"train.eval_samples={min(64, o['num_val'])}"]
    if not args.gan:
        ov += ["loss.gan_weight=0.0", "loss.lecam_weight=0.0"]
    return ov + list(o["model"]) + list(args.set)


def arm_overrides(arm: A.Arm, args, init_from: Path, text_llm: Path | None, stage: str | None = None) -> list[str]:
    """Stage-2 overrides of ``arm`` (``stage="align"``: its stage-1 run)."""
    lr = args.stage1_lr if stage == "align" and args.stage1_lr is not None else args.lr
    ov = [f"stage={stage or arm.stage}", f"model.visual_input={arm.visual_input}", f"train.init_from={init_from}",
          f"optim.lr={lr}", f"optim.projector_lr={lr}"]
    if stage == "align" and args.stage1_curve:  # keep a checkpoint at every curve point
        every = math.gcd(*args.stage1_curve, args.opts["steps1"])
        ov += [f"train.save_every={every}", f"train.keep_last={args.opts['steps1'] // every + 1}"]
    if arm.llm_init == "text":
        ov.append(f"model.llm.path={text_llm}")
    if arm.tuned and stage is None:
        ov += [f"optim.tokenizer_lr={arm.tok_lr_ratio * args.lr:g}", f"loss.alpha={arm.alpha:g}"]
        if has_train_option("log_tokenizer_dynamics"):
            ov.append("train.log_tokenizer_dynamics=true")
    return ov


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.root, self.runs, self.evals = self.out / "data", self.out / "runs", self.out / "eval"
        for d in (self.root, self.runs, self.evals):
            d.mkdir(parents=True, exist_ok=True)
        self.stages = Stages(self.runs, args.recipe, common_overrides(args, self.root, self.runs), args.launcher)
        self.ckpts: dict[str, Path] = {}
        self.text_llm: Path | None = None

    def train_arm(self, arm: A.Arm, seed: int, stage0: Path) -> Path:
        o, st = self.args.opts, self.stages
        align = st.train(arm.align_run(seed), o["steps1"],
                         [f"seed={seed}", *arm_overrides(arm, self.args, stage0, self.text_llm, stage="align")])
        ck = st.train(arm.run(seed), o["steps2"], [f"seed={seed}", *arm_overrides(arm, self.args, align,
                                                                                 self.text_llm)])
        self.ckpts[arm.run(seed)] = ck
        return ck

    def eval_arm(self, arm: A.Arm, seed: int, split: str) -> Path:
        """Path of the per-image samples file of ``arm`` at ``seed`` on ``split``."""
        out = self.evals / split / f"{arm.run(seed)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        n = self.args.opts["num_val" if split == "val" else "num_heldout"]
        self.stages.evaluate(self.ckpts[arm.run(seed)], self.root / split, out, "recon,caption", n)
        return out.with_name(out.stem + "_samples.jsonl")

    def eval_stage0(self, stage0: Path, split: str) -> Path:
        out = self.evals / split / "stage0.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        n = self.args.opts["num_val" if split == "val" else "num_heldout"]
        self.stages.evaluate(stage0, self.root / split, out, "recon", n)
        return out.with_name("stage0_samples.jsonl")

    def text_pretrain(self) -> dict:
        from data_tools.spm import iter_captions
        from data_tools.synth_text import load_corpus
        from ett_ds.config import load_config

        from . import textlm
        o = self.args.opts
        cfg = load_config(self.args.recipe, [o for o in self.stages.common if not o.startswith("out_dir=")])
        captions = list(iter_captions([str(self.root / "train")]))
        corpus = list(load_corpus(tuple(self.plan["corpus"])))
        folder = self.out / "text_llm"
        rec = textlm.pretrain(folder, cfg, captions, corpus, steps=o["text_steps"], batch=o["batch"] * 2,
                              lr=self.args.text_lr, seed=self.args.seed, kind=self.args.text_corpus,
                              noise=self.args.text_noise)
        if rec.pop("trained"):
            self.stages.timings["text_pretrain"] = rec["seconds"]
        log(f"text pretraining ({self.args.text_corpus}): {rec['seconds']} s, loss {rec['loss_curve']}, "
            f"exact match on its own text {rec.get('exact_match')}")
        textlm.check(folder, self.root / "spm.model")
        self.text_llm = folder
        return rec

    def run(self) -> dict:
        from . import report
        args, o = self.args, self.args.opts
        t_start = time.time()
        seeds = [args.seed + k for k in range(args.seeds)]
        log(f"size={args.size} out={self.out} seeds={seeds}")
        try:
            self.plan = D.build(self.root, task=args.task, image=o["image"], digits=o["digits"],
                                num={"train": o["num_train"], "val": o["num_val"], "heldout": o["num_heldout"]},
                                spm_vocab=o["spm_vocab"], seed=args.seed, workers=args.workers,
                                allow_shared_family=args.allow_shared_family)
        except UsageError as e:
            raise SystemExit(f"error: data: {e}") from None
        summary = {"command": "python -m experiments.replicate " + " ".join(map(shlex.quote, args.argv)),
                   "size": args.size, "options": {k: v for k, v in o.items() if k not in ("model", "flags")},
                   "model_overrides": o["model"], "fonts": self.plan["fonts"], "seeds": seeds,
                   "shared_family": self.plan.get("shared_family", []),
                   "paper_alpha": args.paper_alpha, "flags": {k: getattr(args, k) for k in FLAG_DEFAULTS},
                   "timings_s": self.stages.timings}
        if args.stop_after == "data":
            return summary
        stage0, conv = self.stages.converge_stage0(
            [f"seed={args.seed}", "stage=tokenizer", f"optim.tokenizer_lr={args.stage0_lr}", "train.ema_decay=0.99"],
            chunk=o["stage0_chunk"], max_steps=o["steps0_max"], tol_db=args.stage0_tol, window=o["stage0_window"],
            cooldown=o["cooldown"])
        summary["stage0"] = {**conv, "checkpoint": str(stage0)}
        log(f"stage 0 stopped at {conv['stopped_at']} (last gain {conv['last_gain_db']} dB, converged "
            f"{conv['converged']})")
        s0 = {split: self.eval_stage0(stage0, split) for split in ("val", "heldout")}
        if args.stop_after != "stage0":
            if args.text_pretrain:
                summary["text_pretrain"] = self.text_pretrain()
            if args.stage1_curve:
                summary["stage1"] = self.stage1_curve(stage0, seeds[0])
        if args.stop_after not in ("stage0", "stage1"):
            chosen, summary["grid"] = self.grid(stage0, seeds[0], s0["val"])
            summary["chosen"] = {"alpha": chosen[0], "ratio": chosen[1]}
            if args.stop_after == "final":
                final = A.final_arms(chosen, args.paper_alpha, args.und_ratios, args.report_cells,
                                     with_index=args.index, text=args.text_pretrain,
                                     text_full=args.text_full, random_all=args.random_arms == "all")
                samples = {}
                for seed in seeds:  # seed-major: an interrupted run still has whole seeds
                    for arm in final:
                        self.train_arm(arm, seed, stage0)
                        samples.setdefault(arm.name, []).append(self.eval_arm(arm, seed, "heldout"))
                summary["final"] = report.final_table(final, samples, s0["heldout"], self.runs, seeds)
        summary["wall_s"] = round(time.time() - t_start, 1)
        report.write(self.out, summary)
        return summary

    def stage1_curve(self, stage0: Path, seed: int) -> dict:
        """Held-out caption metrics of stage 1 (projector only, LLM frozen) after each ``--stage1-curve`` step, for
        the random LLM and, with ``--text-pretrain``, the text-pretrained one; with the training caption loss."""
        from .stats import arm_stats, per_image
        out = {}
        for arm in ([] if self.args.stage1_text_only else [A.frozen()]) + \
                ([A.frozen("text")] if self.args.text_pretrain else []):
            name = arm.align_run(seed)
            self.stages.train(name, self.args.opts["steps1"],
                              [f"seed={seed}", *arm_overrides(arm, self.args, stage0, self.text_llm, stage="align")])
            points = {}
            for step in self.args.stage1_curve:
                ck = step_folder(self.runs / name, step)
                if ck is None:
                    raise SystemExit(f"error: {self.runs / name} has no checkpoint at step {step}")
                res = self.evals / "heldout" / "stage1" / f"{name}_{step}.json"
                res.parent.mkdir(parents=True, exist_ok=True)
                self.stages.evaluate(ck, self.root / "heldout", res, "caption", self.args.opts["num_heldout"])
                st = arm_stats([per_image(res.with_name(res.stem + "_samples.jsonl"), None)])
                points[step] = {k: st[k] for k in ("em", "cer") if k in st}
            loss = train_curve(self.runs / name, "loss_cap")
            out[arm.llm_init] = {"run": name, "points": points, "loss_cap": loss}
            log(f"stage 1 ({arm.llm_init} LLM): held-out EM " + ", ".join(
                f"{s}: {100 * p['em']['mean']:.1f} %" for s, p in points.items()))
        return out

    def grid(self, stage0: Path, seed: int, s0_val: Path) -> tuple[tuple[float, float], dict | None]:
        from . import report
        args = self.args
        if not args.grid_alphas:
            return (args.alpha, args.ratio), None
        cells = A.grid(args.grid_alphas, args.grid_ratios, args.refine)
        refs = [A.frozen()]
        samples = {}
        for arm in [*refs, *cells]:
            self.train_arm(arm, seed, stage0)
            samples[arm.name] = [self.eval_arm(arm, seed, "val")]
        table = report.final_table([*refs, *cells], samples, s0_val, self.runs, [seed])
        ok = [c for c in cells if table["arms"][c.name]["stats"]["dpsnr"]["mean"] >= -args.max_psnr_drop]
        pool = ok or cells
        best = max(pool, key=lambda c: (table["arms"][c.name]["stats"]["em"]["mean"],
                                        table["arms"][c.name]["stats"]["dpsnr"]["mean"]))
        table["selection"] = {"rule": f"max validation EM among cells with validation ΔPSNR >= "
                                      f"-{args.max_psnr_drop} dB", "eligible": [c.name for c in ok],
                              "chosen": best.name, "fallback_no_cell_eligible": not ok}
        log(f"grid: chose {best.name}")
        return (best.alpha, best.tok_lr_ratio), table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    summary = Runner(args).run()
    md = Path(args.out) / "results.md"
    if md.is_file():
        print(md.read_text())
    log(f"done in {summary.get('wall_s', 0)} s")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()

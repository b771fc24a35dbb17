"""Step benchmark (issue 7): the ett_ds engine's optimizer step against a plain-PyTorch step of the same modules.

    python bench/step_bench.py [--preset cpu-tiny|h200-1.5b|none] [--recipe R] [--steps N --warmup W]
                               [--micro-batch B] [--variants matmul,loader,reference,ett,align,frozen]
                               [--out DIR] [--isolate] [--tag T] [key.sub=value ...]
    python bench/step_bench.py --summarize DIR/results.jsonl

Variants (all timed in one invocation, in this order):

* ``matmul``     bf16 matrix product n x n x n (8192 on GPU, 512 on CPU): the ceiling every MFU is measured against.
* ``loader``     samples/s of the input pipeline (``ett_ds.data.shards.train_batches`` + the real ``Batcher``) over
                 shards made by ``python -m data_tools synth-text`` in a temporary folder; skipped with a message when
                 ``data_tools`` or a font is missing. Compare with the GPU's samples/s: below it, input bounds the run.
* ``reference``  a plain-PyTorch stage-2 step written here: ``ETTModel`` built without DeepSpeed, bf16 autocast
                 (the decoder stays the model's fp32 island), the same activation checkpointing, the same loss
                 L = L_cap + alpha * L_vq (L1, perceptual when configured, quantization, entropy and the
                 discriminator's generator term), the discriminator's own step, gradient clipping and
                 ``torch.optim.AdamW(fused=True)`` on GPU.
* ``ett``        the engine: ``Trainer.train_step`` (ZeRO-3 as resolved by ett_ds, its precision mode, checkpointing).
* ``align``, ``frozen``: the engine at stage 1 and with the tokenizer frozen.

Every variant sees the same on-device batch (random pixels in [-1, 1], captions padded to one fixed sequence length)
so that only the step is timed: ``--warmup`` steps, then ``--steps`` steps, each between two
``torch.cuda.synchronize()`` calls on GPU; s/step is the median (p10 and p90 beside it).

One JSON line per measurement goes to stdout (and is appended to ``--out DIR/results.jsonl``); the last line,
``"variant": "ratio"``, is the engine's speed relative to the reference (reference s/step / engine s/step).

LLM model FLOPs per optimizer step (the convention of shared/docs/performance.md, LLM only, the tokenizer and the
recomputation of checkpointed layers not counted)::

    flops = tokens * (c * N + c * 2 * L * d * S)        c = 6 when the LLM trains (ett, frozen, reference),
                                                         c = 4 when it is frozen but back-propagated (align)

N = LLM parameters (tied embeddings counted once), L = layers, d = hidden size, S = sequence length, tokens = non-pad
tokens of the step (micro-batch x S here). For c = 6 this is 6N per token plus 12*L*d*S for attention (QK^T and AV,
2*2*L*d*S forward, twice that backward). MFU = (flops / s_per_step) / the matmul variant's FLOP/s from the same run.
Peak memory: ``torch.cuda.max_memory_allocated`` since the variant began (GPU); on CPU the process's maximum RSS
(``ru_maxrss``, a high-water mark of the whole process; use ``--isolate`` for one per variant).

``--isolate`` runs every variant in its own child process (clean peak memory; a crash or an out-of-memory in one
variant leaves the others measured); bench/device_run.sh uses it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from stepbench.measure import emit, log, pick_device  # noqa: E402
from stepbench.report import ceiling_from, ratio_row, summarize  # noqa: E402
from stepbench.setup import PRESETS, VARIANTS, Setup  # noqa: E402
from stepbench.variants import common, plan_variant, run_variant  # noqa: E402


def _child_argv(args, variant: str, ceiling, workdir: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--variants", variant, "--preset", args.preset,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--workdir", str(workdir)]
    for flag, val in (("--recipe", args.recipe), ("--micro-batch", args.micro_batch), ("--seq-len", args.seq_len),
                      ("--matmul-n", args.matmul_n), ("--loader-samples", args.loader_samples),
                      ("--loader-batches", args.loader_batches), ("--tag", args.tag), ("--ceiling-flops", ceiling)):
        if val is not None:
            argv += [flag, str(val)]
    return argv + list(args.overrides)


def _run_child(argv: list[str], timeout: float) -> tuple[list[dict], str | None]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return _parse_rows(out), f"timed out after {timeout:.0f} s"
    rows = _parse_rows(out)
    if proc.returncode != 0:
        return rows, f"exit status {proc.returncode}"
    return rows, None


def _parse_rows(text: str) -> list[dict]:
    rows = []
    for line in (text or "").splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        print(line, file=sys.stderr)
    return rows


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/step_bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: h200-1.5b when CUDA is available, else cpu-tiny")
    ap.add_argument("--recipe", help="recipe file or built-in name (default: the preset's)")
    ap.add_argument("--steps", type=int, help="timed steps (median taken)")
    ap.add_argument("--warmup", type=int, help="untimed steps first")
    ap.add_argument("--micro-batch", type=int, help="train.micro_batch_size")
    ap.add_argument("--seq-len", type=int, help="tokens per sample (image + text); default: the preset's")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--out", help="folder; JSON lines are appended to OUT/results.jsonl")
    ap.add_argument("--tag", help="label copied into every line (e.g. mb16, bucket5e8)")
    ap.add_argument("--isolate", action="store_true", help="one child process per variant")
    ap.add_argument("--variant-timeout", type=float, default=600.0, help="seconds per child with --isolate")
    ap.add_argument("--deadline", type=float, help="with --isolate: stop starting variants after this many seconds")
    ap.add_argument("--matmul-n", type=int, help="matrix side of the ceiling measurement")
    ap.add_argument("--loader-samples", type=int, help="synth-text samples generated for the loader variant")
    ap.add_argument("--loader-batches", type=int, help="batches timed by the loader variant")
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ceiling-flops", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--ceiling-from", metavar="JSONL",
                    help="take the matmul ceiling from the last matmul line of this file (instead of --variants matmul)")
    ap.add_argument("--plan", action="store_true",
                    help="build configs, batch and a meta-device model; print what would run (no timing, any machine)")
    ap.add_argument("--summarize", metavar="JSONL", help="print a table of a results.jsonl and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = ap.parse_args(argv)
    for o in args.overrides:
        if "=" not in o:
            ap.error(f"override '{o}' must look like key.sub=value")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)} (valid: {', '.join(VARIANTS)})")
    args.variants = [v for v in VARIANTS if v in variants]  # fixed order: ceiling first, engines last
    return args


def _setup_env(args) -> None:
    import torch
    cuda = torch.cuda.is_available()
    if args.preset is None:
        args.preset = "h200-1.5b" if cuda else "cpu-tiny"
    preset = PRESETS[args.preset]
    if args.steps is None:
        args.steps = preset["steps"]
    if args.warmup is None:
        args.warmup = preset["warmup"]
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        return summarize(Path(args.summarize))
    _setup_env(args)
    if args.ceiling_from and args.ceiling_flops is None:
        args.ceiling_flops = ceiling_from(Path(args.ceiling_from))
    out_file = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out_file = Path(args.out) / "results.jsonl"
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ett_bench_")))
        if args.isolate and not args.child and not args.plan:
            return _main_isolated(args, workdir, out_file)
        return _main_inprocess(args, workdir, None if args.child else out_file)


def _main_inprocess(args, workdir: Path, out_file: Path | None) -> int:
    setup = Setup(args, workdir)
    if args.plan:
        for name in args.variants:
            emit(plan_variant(name, args, setup), None)
        return 0
    device = pick_device()
    ceiling, rows, failed = args.ceiling_flops, [], False
    for name in args.variants:
        log(f"{name}: running ({setup.recipe}, preset {args.preset}, micro-batch {setup.micro_batch})")
        try:
            row = run_variant(name, args, setup, device, ceiling)
        except Exception as e:  # noqa: BLE001 - report and go on: one broken variant must not hide the rest
            import traceback
            traceback.print_exc()
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:500], **common(setup, device)}
            failed = True
        if name == "matmul" and "ceiling_flops" in row:
            ceiling = row["ceiling_flops"]
        rows.append(row)
        emit(row, out_file)
    if not args.child:
        emit(ratio_row(rows, args.tag, _earlier(args)), out_file)
    return 1 if failed else 0


def _main_isolated(args, workdir: Path, out_file: Path | None) -> int:
    ceiling, rows, failed = args.ceiling_flops, [], False
    t_start = time.perf_counter()
    for name in args.variants:
        left = args.variant_timeout
        if args.deadline is not None:
            left = min(left, args.deadline - (time.perf_counter() - t_start))
            if left < 20:
                row = {"variant": name, "skipped": True, "reason": "deadline reached", "tag": args.tag,
                       "preset": args.preset}
                rows.append(row)
                emit(row, out_file)
                continue
        log(f"{name}: child process (timeout {left:.0f} s)")
        got, err = _run_child(_child_argv(args, name, ceiling, workdir), left)
        got = [r for r in got if r.get("variant") == name] or [{"variant": name, "preset": args.preset,
                                                                   "tag": args.tag}]
        row = got[-1]
        if err and "error" not in row and "s_per_step" not in row and "samples_per_s" not in row \
                and "ceiling_flops" not in row:
            row["error"] = err
        if "error" in row:
            failed = True
        if name == "matmul" and "ceiling_flops" in row:
            ceiling = row["ceiling_flops"]
        rows.append(row)
        emit(row, out_file)
    emit(ratio_row(rows, args.tag, _earlier(args)), out_file)
    return 1 if failed else 0


def _earlier(args) -> Path | None:
    return Path(args.ceiling_from) if args.ceiling_from else None


if __name__ == "__main__":
    sys.exit(main())

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
import gc
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("matmul", "loader", "reference", "ett", "align", "frozen")
ENGINE_VARIANTS = ("ett", "align", "frozen")
TIMED = ("reference",) + ENGINE_VARIANTS

# The Qwen2.5-1.5B shape, randomly initialised (nothing is downloaded or loaded).
QWEN25_15B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
              "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6}

def _flow_yaml(d: dict) -> str:
    """One-line YAML for an override value (JSON would turn 1e-6 into a string under YAML 1.1)."""
    import yaml
    return yaml.safe_dump(d, default_flow_style=True, width=1 << 16).strip()


PRESETS = {
    # CI smoke mode: the tiny recipe, seconds on a CPU.
    "cpu-tiny": {"recipe": "tiny", "seq_len": None, "micro_batch": 4, "steps": 3, "warmup": 1, "matmul_n": 512,
                 "loader_samples": 96, "loader_batches": 6,
                 "overrides": ["train.micro_batch_size=4", "data.num_workers=1", "data.shuffle_buffer=32"]},
    # The issue's GPU setting: Qwen2.5-1.5B shape + IBQ-shaped tokenizer (66M with 2 res blocks; override
    # model.tokenizer.num_res_blocks=4 for IBQ's 97M), K = 131,072 x 256, 256^2 images (256 visual tokens) + text
    # to 1024 tokens, micro-batch 8.
    "h200-1.5b": {"recipe": "qwen2.5-1.5b-ibq", "seq_len": 1024, "micro_batch": 8, "steps": 8, "warmup": 3,
                  "matmul_n": 8192, "loader_samples": 512, "loader_batches": 24,
                  "overrides": ["model.llm.path=null", "model.llm.init_config=" + _flow_yaml(QWEN25_15B),
                                "model.llm.gradient_checkpointing=true", "model.tokenizer.checkpoint=null",
                                "model.tokenizer.num_res_blocks=2", "model.tokenizer.codebook_size=131072",
                                "model.tokenizer.code_dim=256", "data.image_size=[256,256]",
                                "data.num_workers=8", "data.shuffle_buffer=64"]},
    # The recipe as it is (its paths must exist; a missing text tokenizer is replaced by one trained here).
    "none": {"recipe": None, "seq_len": None, "micro_batch": None, "steps": 5, "warmup": 2, "matmul_n": None,
             "loader_samples": 256, "loader_batches": 12, "overrides": []},
}

WORDS = ("the quick brown fox jumps over a lazy dog while seven red birds sing near the old stone bridge under a "
         "pale moon and green hills roll toward the blue river where children read books about ships stars trees "
         "cats maps clocks bread cheese apples gardens winter summer").split()


# ---------------------------------------------------------------------------------------------------------------
# small helpers

def _emit(row: dict, out_file: Path | None) -> None:
    line = json.dumps(row, sort_keys=False)
    print(line, flush=True)
    if out_file is not None:
        with open(out_file, "a") as fh:
            fh.write(line + "\n")


def _log(msg: str) -> None:
    print(f"[step_bench] {msg}", file=sys.stderr, flush=True)


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _time_stats(times: list[float]) -> dict:
    s = sorted(times)
    return {"s_per_step": statistics.median(s), "s_p10": _quantile(s, 0.1), "s_p90": _quantile(s, 0.9),
            "steps_timed": len(s)}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _reset_peak(device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> dict:
    import torch
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "peak_mem_kind": "cuda_max_memory_allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_mem_kind": "process_max_rss"}


def _device():
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_name(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------------------------
# setup shared by the variants: config, text tokenizer, one fixed batch

def train_text_tokenizer(folder: Path) -> Path:
    """A small sentencepiece model trained on the spot (byte fallback: any text encodes); its ids fit any LLM vocab."""
    import random
    import sentencepiece as spm
    model = folder / "bench_spm.model"
    if model.is_file():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "bench_spm"),
                                   vocab_size=400, model_type="unigram", character_coverage=1.0, byte_fallback=True,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2)
    return model


class Setup:
    def __init__(self, args, workdir: Path):
        from ett_ds import config as C
        self.args, self.workdir = args, workdir
        preset = PRESETS[args.preset]
        self.preset = preset
        self.recipe = args.recipe or preset["recipe"]
        if self.recipe is None:
            raise SystemExit("error: --preset none needs --recipe")
        self.micro_batch = args.micro_batch or preset["micro_batch"]
        self.seq_len = args.seq_len or preset["seq_len"]
        base = list(preset["overrides"])
        if self.micro_batch:
            base.append(f"train.micro_batch_size={self.micro_batch}")
        base += [f"out_dir={workdir / 'runs'}", "data.demo_dir=null", "train.global_batch_size=null",
                 "train.max_steps=1000000", "optim.warmup_ratio=0", "train.log_every=1000000",
                 "train.image_every=0", f"data.train={workdir / 'shards'}"]
        probe = C.load_config(self.recipe, base + list(args.overrides))
        text_path = probe.model.llm.text_tokenizer or probe.model.llm.path
        if not text_path or not Path(text_path).exists():
            text_path = str(train_text_tokenizer(workdir))
            base.append(f"model.llm.text_tokenizer={text_path}")
        self.base = base
        cfg = self.config("ett")
        self.micro_batch = cfg.train.micro_batch_size
        from ett_ds.data.batch import Batcher
        from ett_ds.models.text import TextTokenizer
        self.text = TextTokenizer(cfg.model.llm.text_tokenizer or cfg.model.llm.path, cfg.model.llm.trust_remote_code)
        prefix = len(Batcher(cfg, self.text, train=False).caption_prompt())
        if self.seq_len:
            self.max_text = self.seq_len - prefix - 1  # + eos
            if self.max_text < 1:
                raise SystemExit(f"error: --seq-len {self.seq_len} leaves no room for text after {prefix} tokens")
        else:
            self.max_text = cfg.data.max_text_tokens
        self.caption_tokens = self.max_text

    def config(self, stage: str):
        from ett_ds import config as C
        cfg = C.load_config(self.recipe, self.base + list(self.args.overrides) + [f"stage={stage}"])
        if hasattr(self, "max_text"):
            cfg.data.max_text_tokens = self.max_text
        return cfg

    def batch(self, cfg, device) -> dict:
        """Random pixels and random captions long enough to fill max_text_tokens: one fixed, pad-free shape."""
        import random
        import torch
        from ett_ds.data.batch import Batcher
        rng = random.Random(1)
        g = torch.Generator().manual_seed(1)
        b = Batcher(cfg, self.text, train=False)
        h, w = cfg.data.image_size
        examples = []
        for _ in range(cfg.train.micro_batch_size):
            words: list[str] = []
            while len(self.text.encode(" ".join(words))) < self.max_text:
                words += [rng.choice(WORDS) for _ in range(16)]
            caption = " ".join(words)
            ids, labels = b.caption_sequence(caption)
            examples.append({"pixels": torch.rand(3, h, w, generator=g) * 2 - 1, "text": caption, "gen": False,
                             "input_ids": ids, "labels": labels})
        batch = b.collate(examples)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _llm_flops(llm, batch: dict, llm_trains: bool) -> dict:
    """Model FLOPs of the LLM for one step (see the module docstring)."""
    n = sum(int(getattr(p, "ds_numel", p.numel())) for p in llm.parameters())
    layers, d = int(llm.config.num_hidden_layers), int(llm.config.hidden_size)
    seq = int(batch["input_ids"].shape[1])
    tokens = int(batch["attention_mask"].sum())
    c = 6 if llm_trains else 4
    return {"llm_params": n, "seq_len": seq, "tokens_per_step": tokens,
            "llm_flops_per_step": float(tokens) * (c * n + c * 2 * layers * d * seq),
            "flops_factor": c}


def _throughput(row: dict, samples: int, ceiling: float | None) -> dict:
    s = row["s_per_step"]
    row["samples_per_s"] = samples / s
    if "tokens_per_step" in row:
        row["tokens_per_s"] = row["tokens_per_step"] / s
    if "llm_flops_per_step" in row:
        row["llm_tflops"] = row["llm_flops_per_step"] / s / 1e12
        row["mfu"] = (row["llm_flops_per_step"] / s / ceiling) if ceiling else None
    return row


# ---------------------------------------------------------------------------------------------------------------
# variants

def run_matmul(args, setup, device) -> dict:
    import torch
    n = args.matmul_n or setup.preset["matmul_n"] or (8192 if device.type == "cuda" else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    reps = 10 if device.type == "cuda" else 3
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        times.append((time.perf_counter() - t0) / reps)
    st = _time_stats(times)
    flops = 2.0 * n ** 3
    return {"variant": "matmul", "n": n, "dtype": "bfloat16", "s_per_matmul": st["s_per_step"],
            "s_p10": st["s_p10"], "s_p90": st["s_p90"], "tflops": flops / st["s_per_step"] / 1e12,
            "ceiling_flops": flops / st["s_per_step"]}


def _precision(cfg) -> str:
    """The precision the engine runs in (``auto``: bf16 autocast on GPU, fp32 on CPU)."""
    from ett_ds.engine import deepspeed as eng
    resolve = getattr(eng, "resolved_precision", None)
    return resolve(cfg) if resolve is not None else cfg.engine.precision


def run_reference(args, setup, device, ceiling) -> dict:
    """Plain PyTorch: the same ETTModel, losses and discriminator, no DeepSpeed."""
    import torch
    from ett_ds.engine import deepspeed as eng
    from ett_ds.models.ett import ETTModel
    from ett_ds.tokenizers.objective import VQObjective

    cfg = setup.config("ett")
    eng.setup_backends(cfg)
    eng._HF_DS_CONFIG = None  # no deepspeed.zero.Init for this model, even after an engine variant in-process
    torch.manual_seed(cfg.seed)
    build_ctx = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with build_ctx:
            model = ETTModel(cfg, setup.text.vocab_size, setup.text.image_id)
    except Exception as e:  # noqa: BLE001 - building under a default device is an optimisation only
        _log(f"reference: building on {device} failed ({e!r}); building on CPU")
        model = ETTModel(cfg, setup.text.vocab_size, setup.text.image_id)
    model.to(device).train()
    objective = VQObjective(cfg.loss, cfg.model.tokenizer.in_channels).to(device)  # L_vq, as the trainer has it
    fused = device.type == "cuda" if cfg.engine.fused_optimizer is None else cfg.engine.fused_optimizer
    opt = torch.optim.AdamW(eng.param_groups(model, cfg), fused=bool(fused))
    params = [p for g in opt.param_groups for p in g["params"]]
    batch = setup.batch(cfg, device)
    inputs = {k: batch[k] for k in ("pixels", "input_ids", "attention_mask", "labels", "gen_mask")}
    bf16 = _precision(cfg) == "autocast_bf16"
    state = {"step": 0}

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**inputs)
        l_vq, _ = objective(inputs["pixels"], out["recon"], out["quantizer_terms"], state["step"])
        loss = out["loss_cap"] + cfg.loss.alpha * l_vq
        loss.backward()
        loss_d, _ = objective.discriminator_loss(inputs["pixels"], out["recon"], state["step"])
        objective.backward_discriminator(loss_d)
        objective.apply_step()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    times = _time_steps(step, device, args.warmup, args.steps)
    row = {"variant": "reference", "stage": "ett", "precision": _precision(cfg),
           "optimizer": f"torch.AdamW(fused={bool(fused)})"}
    row.update(_time_stats(times))
    row.update(_llm_flops(model.llm, batch, True))
    row = _throughput(row, cfg.train.micro_batch_size, ceiling)
    del model, objective, opt, params, batch, inputs
    return row


def run_engine(stage: str, args, setup, device, ceiling) -> dict:
    from ett_ds.engine import deepspeed as eng
    from ett_ds.engine import dist
    from ett_ds.trainer import Trainer

    dist.init_distributed()
    cfg = setup.config(stage)
    tr = Trainer(cfg)
    batch = setup.batch(cfg, device)

    def forever():
        while True:
            yield dict(batch)

    it = forever()
    times = _time_steps(lambda: tr.train_step(it), device, args.warmup, args.steps)
    zero = tr.ds_config.get("zero_optimization", {})
    row = {"variant": stage, "stage": stage, "precision": _precision(cfg), "zero_stage": zero.get("stage"),
           "bucket_size": zero.get("reduce_bucket_size"),
           "persistence_threshold": zero.get("stage3_param_persistence_threshold"),
           "optimizer": type(tr.engine.optimizer).__name__, "accum": tr.accum}
    row.update(_time_stats(times))
    flops = _llm_flops(tr.model.llm, batch, "llm" in tr.spec.trains)
    flops["tokens_per_step"] *= tr.accum
    flops["llm_flops_per_step"] *= tr.accum
    row.update(flops)
    row = _throughput(row, cfg.train.micro_batch_size * tr.accum, ceiling)
    destroy = getattr(tr.engine, "destroy", None)
    if destroy is not None:
        with contextlib.suppress(Exception):
            destroy()
    eng._HF_DS_CONFIG = None
    del tr, batch, it
    return row


def _find_fonts() -> list[str]:
    env = os.environ.get("ETT_BENCH_FONTS")
    if env:
        return [f for f in env.split(os.pathsep) if f]
    from data_tools.demo import find_fonts
    train, _ = find_fonts()
    return train[:4]


def run_loader(args, setup, device) -> dict:
    import importlib.util
    cfg = setup.config("ett")
    skip = {"variant": "loader", "skipped": True}
    if importlib.util.find_spec("data_tools") is None or importlib.util.find_spec("data_tools.synth_text") is None:
        return {**skip, "reason": "data_tools synth-text is not in this checkout"}
    try:
        fonts = _find_fonts()
    except Exception as e:  # noqa: BLE001 - no font on this machine: the variant cannot run, the others can
        return {**skip, "reason": f"no font for synth-text: {e}"}
    if not fonts:
        return {**skip, "reason": "no font for synth-text"}
    corpus = REPO / "data_tools" / "assets" / "phrases.txt"
    if not corpus.is_file():
        return {**skip, "reason": f"no corpus file {corpus}"}
    h, w = cfg.data.image_size
    shards = Path(cfg.data.train)
    num = args.loader_samples or setup.preset["loader_samples"]
    if not list(shards.glob("*.tar")):
        workers = max(1, min(8, (os.cpu_count() or 1)))
        cmd = [sys.executable, "-m", "data_tools", "synth-text", "--fonts", *fonts, "--corpus", str(corpus),
               "--num", str(num), "--size", f"{h}x{w}", "--out", str(shards), "--prefix", "bench",
               "--samples-per-shard", str(max(1, num // 4)), "--workers", str(workers), "--no-progress"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            return {**skip, "reason": f"synth-text failed (rc {res.returncode}): {tail[0]}"}
        _log(f"loader: {num} synth-text samples at {h}x{w} in {time.perf_counter() - t0:.1f} s")
    from ett_ds.data.batch import Batcher
    from ett_ds.data.shards import train_batches
    batcher = Batcher(cfg, setup.text, train=True)
    bs, workers = cfg.train.micro_batch_size, cfg.data.num_workers
    gen = train_batches(str(shards), batch_size=bs, make_example=batcher.make_example, collate=batcher.collate,
                        seed=cfg.seed, rank=0, world_size=1, num_workers=workers,
                        shuffle_buffer=cfg.data.shuffle_buffer, max_error_rate=cfg.data.max_error_rate,
                        shuffle_initial=min(cfg.data.shuffle_buffer, 16))
    n_batches = args.loader_batches or setup.preset["loader_batches"]
    try:
        t_first = time.perf_counter()
        for _ in range(max(2, workers)):  # worker start-up and one batch from each worker
            next(gen)
        t_first = time.perf_counter() - t_first
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(gen)
        dt = time.perf_counter() - t0
    finally:
        gen.close()
    return {"variant": "loader", "num_workers": workers, "batch_size": bs, "image_size": [h, w],
            "batches_timed": n_batches, "s_per_batch": dt / n_batches, "samples_per_s": n_batches * bs / dt,
            "startup_s": t_first}


# ---------------------------------------------------------------------------------------------------------------
# driving

def plan_variant(name: str, args, setup) -> dict:
    """What a variant would run, without running it: config, shapes and the FLOP count (model on the meta device)."""
    import torch
    from ett_ds.engine import deepspeed as eng
    from ett_ds.models.ett import ETTModel
    row = {"variant": name, "plan": True}
    if name == "matmul":
        n = args.matmul_n or setup.preset["matmul_n"]
        return {**row, "n": n, "flops": 2.0 * n ** 3 if n else None}
    stage = name if name in ENGINE_VARIANTS else "ett"
    cfg = setup.config(stage)
    batch = setup.batch(cfg, torch.device("cpu"))
    row.update({"stage": stage, "image_size": cfg.data.image_size, "micro_batch": cfg.train.micro_batch_size,
                "num_workers": cfg.data.num_workers})
    if name == "loader":
        return row
    eng._HF_DS_CONFIG = None
    with torch.device("meta"):
        model = ETTModel(cfg, setup.text.vocab_size, setup.text.image_id)
    row["tokenizer_params"] = sum(p.numel() for p in model.tokenizer.parameters())
    row["llm_trains"] = "llm" in model.spec.trains
    row.update(_llm_flops(model.llm, batch, row["llm_trains"] or name == "reference"))
    if name in ENGINE_VARIANTS:
        ds = eng.resolve_ds_config(cfg, 1, int(model.llm.config.hidden_size))
        row["zero_optimization"] = ds.get("zero_optimization")
        row["torch_autocast"] = "torch_autocast" in ds
    return row


def _common(setup, device) -> dict:
    import torch
    cfg = setup.config("ett")
    return {"preset": setup.args.preset, "tag": setup.args.tag, "micro_batch": setup.micro_batch,
            "grad_ckpt": cfg.model.llm.gradient_checkpointing, "image_size": cfg.data.image_size,
            "tokenizer_res_blocks": cfg.model.tokenizer.num_res_blocks, "codebook_size": cfg.model.tokenizer.codebook_size,
            "device": _device_name(device), "torch": torch.__version__, "overrides": list(setup.args.overrides)}


def run_variant(name: str, args, setup, device, ceiling) -> dict:
    import torch
    _reset_peak(device)
    t0 = time.perf_counter()
    if name == "matmul":
        row = run_matmul(args, setup, device)
    elif name == "loader":
        row = run_loader(args, setup, device)
    elif name == "reference":
        row = run_reference(args, setup, device, ceiling)
    else:
        row = run_engine(name, args, setup, device, ceiling)
    if not row.get("skipped") and name != "loader":
        row.update(_peak(device))
    row["wall_s"] = time.perf_counter() - t0
    if "deepspeed" in sys.modules:
        row["deepspeed"] = getattr(sys.modules["deepspeed"], "__version__", None)
    row.update({k: v for k, v in _common(setup, device).items() if k not in row})
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def ratio_row(rows: list[dict], tag, earlier: Path | None = None) -> dict:
    """The engine's speed relative to the reference. Without a reference in this invocation, the latest
    override-free reference of the same micro-batch in ``earlier`` (a results.jsonl) stands in, and is named."""
    by = {r["variant"]: r for r in rows if "s_per_step" in r or "samples_per_s" in r}
    row = {"variant": "ratio", "tag": tag, "engine": "ett", "reference": "reference", "target": 0.90}
    ett, ref, loader = by.get("ett"), by.get("reference"), by.get("loader")
    if ett and not ref and earlier is not None and earlier.is_file():
        for line in earlier.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                if (r.get("variant") == "reference" and "s_per_step" in r and not r.get("overrides")
                        and r.get("micro_batch") == ett.get("micro_batch") and r.get("preset") == ett.get("preset")):
                    ref = r
        if ref:
            row["reference_from_tag"] = ref.get("tag")
    if ett and ref and "s_per_step" in ett and "s_per_step" in ref:
        row.update({"engine_s_per_step": ett["s_per_step"], "reference_s_per_step": ref["s_per_step"],
                    "engine_over_reference": ref["s_per_step"] / ett["s_per_step"],
                    "engine_peak_mem_gib": ett.get("peak_mem_gib"), "reference_peak_mem_gib": ref.get("peak_mem_gib"),
                    "engine_mfu": ett.get("mfu"), "reference_mfu": ref.get("mfu")})
    else:
        missing = [v for v, r in (("ett", ett), ("reference", ref)) if not r]
        row.update({"engine_over_reference": None, "reason": f"not measured: {', '.join(missing)}"})
    if loader and ett and "samples_per_s" in loader:
        row["loader_over_engine_samples"] = loader["samples_per_s"] / ett["samples_per_s"]
        row["input_bound"] = loader["samples_per_s"] < ett["samples_per_s"]
    return row


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
        args.ceiling_flops = _ceiling_from(Path(args.ceiling_from))
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
            _emit(plan_variant(name, args, setup), None)
        return 0
    device = _device()
    ceiling, rows, failed = args.ceiling_flops, [], False
    for name in args.variants:
        _log(f"{name}: running ({setup.recipe}, preset {args.preset}, micro-batch {setup.micro_batch})")
        try:
            row = run_variant(name, args, setup, device, ceiling)
        except Exception as e:  # noqa: BLE001 - report and go on: one broken variant must not hide the rest
            import traceback
            traceback.print_exc()
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:500], **_common(setup, device)}
            failed = True
        if name == "matmul" and "ceiling_flops" in row:
            ceiling = row["ceiling_flops"]
        rows.append(row)
        _emit(row, out_file)
    if not args.child:
        _emit(ratio_row(rows, args.tag, _earlier(args)), out_file)
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
                _emit(row, out_file)
                continue
        _log(f"{name}: child process (timeout {left:.0f} s)")
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
        _emit(row, out_file)
    _emit(ratio_row(rows, args.tag, _earlier(args)), out_file)
    return 1 if failed else 0


def _earlier(args) -> Path | None:
    return Path(args.ceiling_from) if args.ceiling_from else None


def _ceiling_from(path: Path) -> float | None:
    best = None
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if row.get("variant") == "matmul" and row.get("ceiling_flops"):
                    best = float(row["ceiling_flops"])
    if best is None:
        _log(f"no matmul line in {path}: MFU will be null")
    return best


def summarize(path: Path) -> int:
    """A fixed-width table of every line of a results.jsonl (the device script prints it last)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    print(f"{'tag':<14} {'variant':<10} {'mb':>3} {'s/step':>8} {'p10':>8} {'p90':>8} {'samp/s':>8} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}  note")
    for r in rows:
        v = r.get("variant")
        tag = str(r.get("tag") or "-")[:14]
        if v == "ratio":
            note = (f"engine/reference = {f(r.get('engine_over_reference'), '.3f')} (target >= {r.get('target')})"
                    + (f" vs the {r['reference_from_tag']} reference" if r.get("reference_from_tag") else "")
                    + (f", loader/engine samples = {f(r.get('loader_over_engine_samples'), '.2f')}"
                       if "loader_over_engine_samples" in r else "") + (f" {r['reason']}" if "reason" in r else ""))
            print(f"{tag:<14} {'ratio':<10} {'':>3} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} {'':>6} {'':>9}  {note}")
            continue
        note = r.get("error") or (f"skipped: {r.get('reason')}" if r.get("skipped") else "")
        if v == "matmul" and "tflops" in r:
            note = f"bf16 {r.get('n')}^3 = {r['tflops']:.4g} TFLOP/s (the MFU ceiling)"
        if r.get("overrides"):
            note = (note + " " if note else "") + " ".join(o for o in r["overrides"])[:80]
        s = r.get("s_per_step", r.get("s_per_batch", r.get("s_per_matmul")))
        print(f"{tag:<14} {str(v):<10} {f(r.get('micro_batch'), 'd'):>3} {f(s, '.4f'):>8} {f(r.get('s_p10'), '.4f'):>8} "
              f"{f(r.get('s_p90'), '.4f'):>8} {f(r.get('samples_per_s'), '.1f'):>8} {f(r.get('llm_tflops'), '.4g'):>8} "
              f"{f(r.get('mfu') * 100 if isinstance(r.get('mfu'), float) else None, '.1f'):>6} "
              f"{f(r.get('peak_mem_gib'), '.2f'):>9}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

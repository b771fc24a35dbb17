"""The timed variants (matmul ceiling, loader, plain-PyTorch reference, the engine) and plan mode."""
from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

from .measure import device_name, llm_flops, log, peak, reset_peak, sync, throughput, time_stats, time_steps
from .setup import ENGINE_VARIANTS

REPO = Path(__file__).resolve().parents[2]


def run_matmul(args, setup, device) -> dict:
    import torch
    n = args.matmul_n or setup.preset["matmul_n"] or (8192 if device.type == "cuda" else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    reps = 10 if device.type == "cuda" else 3
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / reps)
    st = time_stats(times)
    flops = 2.0 * n ** 3
    return {"variant": "matmul", "n": n, "dtype": "bfloat16", "s_per_matmul": st["s_per_step"],
            "s_p10": st["s_p10"], "s_p90": st["s_p90"], "tflops": flops / st["s_per_step"] / 1e12,
            "ceiling_flops": flops / st["s_per_step"]}


def precision(cfg) -> str:
    """The precision the engine runs in (``auto``: bf16 autocast on GPU, fp32 on CPU)."""
    from ett_ds.engine import deepspeed as eng
    resolve = getattr(eng, "resolved_precision", None)
    return resolve(cfg) if resolve is not None else cfg.engine.precision


def run_reference(args, setup, device, ceiling) -> dict:
    """Plain PyTorch: the same ETTModel, losses and discriminator, no DeepSpeed."""
    import torch

    from ett_ds.engine import deepspeed as eng
    from ett_ds.models.ett import MODEL_INPUTS, ETTModel  # MODEL_INPUTS: what the model's forward takes
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
        log(f"reference: building on {device} failed ({e!r}); building on CPU")
        model = ETTModel(cfg, setup.text.vocab_size, setup.text.image_id)
    model.to(device).train()
    objective = VQObjective(cfg.loss, cfg.model.tokenizer.in_channels).to(device)  # L_vq, as the trainer has it
    fused = device.type == "cuda" if cfg.engine.fused_optimizer is None else cfg.engine.fused_optimizer
    opt = torch.optim.AdamW(eng.param_groups(model, cfg), fused=bool(fused))
    params = [p for g in opt.param_groups for p in g["params"]]
    batch = setup.batch(cfg, device)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    bf16 = precision(cfg) == "autocast_bf16"
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

    times = time_steps(step, device, args.warmup, args.steps)
    row = {"variant": "reference", "stage": "ett", "precision": precision(cfg),
           "optimizer": f"torch.AdamW(fused={bool(fused)})"}
    row.update(time_stats(times))
    row.update(llm_flops(model.llm, batch, True))
    row = throughput(row, cfg.train.micro_batch_size, ceiling)
    return row  # model, optimizer and batch are freed with this frame


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
    times = time_steps(lambda: tr.train_step(it), device, args.warmup, args.steps)
    zero = tr.ds_config.get("zero_optimization", {})
    row = {"variant": stage, "stage": stage, "precision": precision(cfg), "zero_stage": zero.get("stage"),
           "bucket_size": zero.get("reduce_bucket_size"),
           "persistence_threshold": zero.get("stage3_param_persistence_threshold"),
           "optimizer": type(tr.engine.optimizer).__name__, "accum": tr.accum}
    row.update(time_stats(times))
    flops = llm_flops(tr.model.llm, batch, "llm" in tr.spec.trains)
    flops["tokens_per_step"] *= tr.accum
    flops["llm_flops_per_step"] *= tr.accum
    row.update(flops)
    row = throughput(row, cfg.train.micro_batch_size * tr.accum, ceiling)
    destroy = getattr(tr.engine, "destroy", None)
    if destroy is not None:
        with contextlib.suppress(Exception):
            destroy()
    eng._HF_DS_CONFIG = None
    tr = batch = it = None  # the engine goes before the next variant runs
    return row


def find_fonts() -> list[str]:
    env = os.environ.get("ETT_BENCH_FONTS")
    if env:
        return [f for f in env.split(os.pathsep) if f]
    from data_tools.fonts import demo_split
    train, _ = demo_split()
    return train[:4]


def run_loader(args, setup, device) -> dict:
    import importlib.util
    cfg = setup.config("ett")
    skip = {"variant": "loader", "skipped": True}
    if importlib.util.find_spec("data_tools") is None or importlib.util.find_spec("data_tools.synth_text") is None:
        return {**skip, "reason": "data_tools synth-text is not in this checkout"}
    try:
        fonts = find_fonts()
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
        log(f"loader: {num} synth-text samples at {h}x{w} in {time.perf_counter() - t0:.1f} s")
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
    row.update(llm_flops(model.llm, batch, row["llm_trains"] or name == "reference"))
    if name in ENGINE_VARIANTS:
        ds = eng.resolve_ds_config(cfg, 1, int(model.llm.config.hidden_size))
        row["zero_optimization"] = ds.get("zero_optimization")
        row["torch_autocast"] = "torch_autocast" in ds
    return row


def common(setup, device) -> dict:
    import torch
    cfg = setup.config("ett")
    return {"preset": setup.args.preset, "tag": setup.args.tag, "micro_batch": setup.micro_batch,
            "grad_ckpt": cfg.model.llm.gradient_checkpointing, "image_size": cfg.data.image_size,
            "tokenizer_res_blocks": cfg.model.tokenizer.num_res_blocks, "codebook_size": cfg.model.tokenizer.codebook_size,
            "device": device_name(device), "torch": torch.__version__, "overrides": list(setup.args.overrides)}


def run_variant(name: str, args, setup, device, ceiling) -> dict:
    import torch
    reset_peak(device)
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
        row.update(peak(device))
    row["wall_s"] = time.perf_counter() - t0
    if "deepspeed" in sys.modules:
        row["deepspeed"] = getattr(sys.modules["deepspeed"], "__version__", None)
    row.update({k: v for k, v in common(setup, device).items() if k not in row})
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row



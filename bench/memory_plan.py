"""Where the GPU memory of a training step goes, per GPU, for a recipe and a GPU count (issue 12).

    python bench/memory_plan.py                                   # qwen2.5-1.5b-ibq on 1 and 8 GPUs of 80 and 141 GB
    python bench/memory_plan.py --gpus 8 --gpu-gb 80 --json       # one setting, machine-readable
    python bench/memory_plan.py --preset h200-1.5b --micro-batch 8 --compare OUT/results.jsonl  # vs a GPU step bench

Model states: the model is built on the meta device (nothing allocated) and its parameters counted per part; under
ZeRO-3 with torch autocast the parameters are fp32 and DeepSpeed keeps no second master copy, so a trained parameter
costs 4 (weight) + 4 (gradient) + 8 (Adam m, v) bytes / GPUs and a frozen one 4 / GPUs. DeepSpeed's own estimator
(``estimate_zero3_model_states_mem_needs``, fp16 weights + fp32 master: 18 bytes / GPUs + the largest layer) is
printed next to it. Working buffers: the largest layer gathered in fp32, the prefetch bucket (bf16) and the reduce
bucket (fp32) of the resolved DeepSpeed config. Activations are measured on this CPU from one forward + backward
under bf16 autocast (the recipe's precision), each at two sizes so that fixed costs cancel and the slope is scaled:
the tokenizer with its reconstruction losses (L1 + GAN generator) at two reduced image sides (bytes per pixel); the
chunked quantizer at the recipe's K at two token counts (fixed chunk working set + per token); one LLM decoder layer
at two reduced sequence lengths (bytes per token). Per sample: tokenizer + quantizer
per-token part + (checkpointing: one layer input per layer + one layer's activations recomputed in backward; else
every layer's); the LM-head loss's chunk working set (losses.head_caption_loss) and the quantizer's are added once.
Tokenizer and LLM layer: the bytes autograd saves for backward (what is alive between forward and backward; the
parameters' gradients are model states, and ZeRO-3 reduces them in buckets, so the CPU's peak RSS, which holds them
all, is recorded but not used). Quantizer: its peak RSS growth, since its chunked working set is transient.
The largest micro-batch whose total fits 90% of the GPU (10% for the allocator's fragmentation) is the one that fits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)  # divisors of the recipes' global batches


def build_config(recipe: str, overrides: list[str]):
    from stepbench.setup import PRESETS, QWEN25_15B, flow_yaml  # the Qwen2.5-1.5B shape, randomly initialised

    from ett_ds.config import load_config
    if recipe in PRESETS:  # a step-bench preset: its recipe and overrides (what a GPU step bench ran)
        preset = PRESETS[recipe]
        return load_config(preset["recipe"], preset["overrides"] + overrides), preset
    base = ["model.llm.path=null", "model.llm.init_config=" + flow_yaml(QWEN25_15B), "model.tokenizer.checkpoint=null"]
    return load_config(recipe, base + overrides), None


def count_params(cfg, vocab: int) -> dict:
    """Parameters per part (meta device: nothing allocated), trained vs frozen, and the largest module's own."""
    from ett_ds.engine import deepspeed as eng
    from ett_ds.models.ett import ETTModel
    from ett_ds.tokenizers.discriminator import GANLoss
    eng._HF_DS_CONFIG = None  # no zero.Init here
    # torch's meta device, not accelerate's init_empty_weights: under the latter the LLM's tied input / output
    # embeddings come out as two parameters (measured: Qwen2.5-1.5B counted 233M parameters too many)
    with torch.device("meta"):
        model = ETTModel(cfg, vocab, vocab - 1)
        disc = GANLoss(cfg.loss, cfg.model.tokenizer.in_channels) if model.spec.reconstruct else None
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.parts().items()}
    trained = sum(n for name, n in parts.items() if name in model.spec.trains)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"parts": parts, "total": sum(parts.values()), "trained": trained, "largest_layer": largest,
            "discriminator": sum(p.numel() for p in disc.parameters()) if disc is not None else 0,
            "hidden": int(model.llm.config.hidden_size) if model.llm is not None else 0,
            "layers": int(model.llm.config.num_hidden_layers) if model.llm is not None else 0,
            "vocab": vocab, "uses_llm": model.llm is not None}


def model_states(cfg, p: dict, gpus: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from ett_ds.engine import deepspeed as eng
    ds = eng.resolve_ds_config(cfg, gpus, p["hidden"] or 1024)
    z = ds["zero_optimization"]
    stage = z.get("stage", 0)
    shard = gpus if stage == 3 else 1
    frozen = p["total"] - p["trained"]
    weights = 4 * p["total"] / shard
    grads = 4 * p["trained"] / (gpus if stage >= 2 else 1)
    optim = 8 * p["trained"] / (gpus if stage >= 1 else 1)
    disc = 16 * p["discriminator"]  # the discriminator and its Adam live outside the engine, on every GPU
    buffers = 4 * p["largest_layer"] + 2 * float(z.get("stage3_prefetch_bucket_size", 0)) \
        + 4 * float(z.get("reduce_bucket_size", 0))
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(p["total"], p["largest_layer"], num_gpus_per_node=gpus,
                                                         cpu_offload=False, cpu_offload_params=False)
    return {"zero_stage": stage, "weights_gb": weights / GB, "grads_gb": grads / GB, "optimizer_gb": optim / GB,
            "discriminator_gb": disc / GB, "buffers_gb": buffers / GB, "frozen_params": frozen,
            "deepspeed_estimator_gb": ds_gpu / GB,
            "total_gb": (weights + grads + optim + disc + buffers) / GB}


# -- activations, measured on the CPU ---------------------------------------------------------------------------------

def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, params) -> dict:
    """Peak RSS growth of fn() (forward + backward; it includes the parameters' gradients) and the bytes of the
    tensors autograd saved for backward (unique storages, parameters excluded): what stays alive from forward to
    backward."""
    import gc
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t
    fn()  # warm-up: first-call costs (thread pools, kernels' workspaces) are not activations
    for q in params:
        q.grad = None
    gc.collect()
    before = _rss("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    peak = _rss("VmHWM") - before
    for q in params:
        q.grad = None
    return {"peak_gb": peak / GB, "saved_gb": sum(seen.values()) / GB}


def _slope(small: dict, large: dict, x_small: float, x_large: float) -> dict:
    """Per-unit (pixel, token) bytes from two sizes: fixed costs (allocator, thread pools, workspaces) cancel."""
    out = {}
    for k in ("peak_gb", "saved_gb"):
        per = max(large[k] - small[k], 0.0) / (x_large - x_small)
        out[k.replace("_gb", "_gb_per_unit")] = per
        out[k.replace("_gb", "_fixed_gb")] = max(small[k] - per * x_small, 0.0)
    return out


def measure_activations(cfg, p: dict, side: int, seq: int, tokens: tuple[int, int]) -> dict:
    from dataclasses import replace

    from ett_ds.tokenizers import build_tokenizer
    from ett_ds.tokenizers.ibq import IBQuantizer
    from ett_ds.tokenizers.objective import VQObjective
    torch.manual_seed(0)
    tcfg = cfg.model.tokenizer
    out = {}
    # tokenizer (small codebook: the quantizer is measured on its own below) + its reconstruction losses
    tok = build_tokenizer(replace(tcfg, codebook_size=1024, checkpoint=None))
    objective = VQObjective(replace(cfg.loss, gan_start_step=0, perceptual_weights=None), tcfg.in_channels)
    sizes = []
    for s_ in (side // 2, side):
        x = torch.rand(1, 3, s_, s_) * 2 - 1

        def tok_step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                quantized = tok.encode(x)
                recon = tok.decode(quantized.z_q)
                loss = objective(x, recon, quantized.terms, step=0)[0]
            loss.backward()
        sizes.append(measure(tok_step, list(tok.parameters()) + list(objective.parameters())))
    out["tokenizer"] = {"sides": [side // 2, side], "at": sizes,
                        **_slope(sizes[0], sizes[1], (side // 2) ** 2, side ** 2)}  # per pixel
    tok = objective = None  # freed before the quantizer is measured
    # the chunked quantizer at the recipe's K, two token counts -> fixed + per-token
    q = IBQuantizer(tcfg.codebook_size, tcfg.code_dim, init_std=1.0, chunk_tokens=tcfg.quantizer_chunk_tokens)
    rows = []
    for n in tokens:
        z = torch.randn(1, tcfg.code_dim, 1, n, requires_grad=True)

        def q_step():
            z_q, _, terms = q(z)
            (z_q.sum() + terms["quant"] + 0.05 * terms["entropy"]).backward()
        rows.append(measure(q_step, [*q.parameters(), z]))
    per_tok = max(rows[1]["peak_gb"] - rows[0]["peak_gb"], 0) / (tokens[1] - tokens[0])
    out["quantizer"] = {"tokens": list(tokens), "chunk_tokens": q.chunk_tokens, "peak_gb": [r["peak_gb"] for r in rows],
                        "per_token_gb": per_tok, "fixed_gb": max(rows[0]["peak_gb"] - per_tok * tokens[0], 0)}
    q = None  # freed before the LLM layer is measured
    # one LLM decoder layer (the Qwen2 body with one layer and a tiny vocabulary) at a reduced sequence length
    if p["uses_llm"]:
        from transformers import AutoConfig, AutoModel
        kw = dict(cfg.model.llm.init_config or {})
        mt = kw.pop("model_type", "qwen2")
        kw.update(num_hidden_layers=1, vocab_size=64)
        body = AutoModel.from_config(AutoConfig.for_model(mt, **kw), attn_implementation="sdpa")
        sizes = []
        for n in (seq // 2, seq):
            h = torch.randn(1, n, p["hidden"], requires_grad=True)

            def layer_step():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = body(inputs_embeds=h, use_cache=False).last_hidden_state
                y.float().sum().backward()
            sizes.append(measure(layer_step, [*body.parameters(), h]))
        out["llm_layer"] = {"seqs": [seq // 2, seq], "at": sizes, **_slope(sizes[0], sizes[1], seq // 2, seq)}
    return out


def activations_per_gpu(cfg, p: dict, act: dict, mb: int, seq_full: int, image_tokens: int) -> dict:
    """Activation bytes of one micro-batch step, from the CPU measurements scaled to the recipe's shapes."""
    from ett_ds.tokenizers.chunked import CHUNK_BUDGET_BYTES
    pixels = cfg.data.image_size[0] * cfg.data.image_size[1]
    tok = act["tokenizer"]["saved_gb_per_unit"] * pixels * mb
    qz = act["quantizer"]["fixed_gb"] + act["quantizer"]["per_token_gb"] * image_tokens * mb
    llm = head = 0.0
    if p["uses_llm"]:
        per_layer = act["llm_layer"]["saved_gb_per_unit"] * seq_full * mb
        boundary = seq_full * p["hidden"] * 4 * mb / GB  # a checkpointed layer keeps its fp32 input
        if cfg.model.llm.gradient_checkpointing:
            llm = p["layers"] * boundary + per_layer
        else:
            llm = p["layers"] * per_layer
        head = 5 * 4 * min(seq_full * mb, CHUNK_BUDGET_BYTES // (4 * 5 * p["vocab"])) * p["vocab"] / GB
    return {"tokenizer_gb": tok, "quantizer_gb": qz, "llm_gb": llm, "lm_head_gb": head,
            "total_gb": tok + qz + llm + head}


def plan(cfg, p, act, gpus: int, gpu_gb: float, seq_full: int, image_tokens: int, headroom: float = 0.9) -> dict:
    states = model_states(cfg, p, gpus)
    rows, fits = [], None
    for mb in MICRO_BATCHES:
        a = activations_per_gpu(cfg, p, act, mb, seq_full, image_tokens)
        total = states["total_gb"] + a["total_gb"]
        ok = total <= headroom * gpu_gb
        rows.append({"micro_batch": mb, **{k: round(v, 2) for k, v in a.items()}, "step_total_gb": round(total, 2),
                     "fits": ok})
        if ok:
            fits = mb
    return {"gpus": gpus, "gpu_gb": gpu_gb, "model_states": {k: round(v, 3) if isinstance(v, float) else v
                                                              for k, v in states.items()},
            "micro_batches": rows, "largest_fitting_micro_batch": fits}


def print_plan(pl: dict) -> None:
    s = pl["model_states"]
    print(f"\n## {pl['gpus']} GPU(s) x {pl['gpu_gb']:g} GB   (ZeRO-{s['zero_stage']})")
    print(f"model states per GPU: weights {s['weights_gb']:.2f} + grads {s['grads_gb']:.2f} + Adam "
          f"{s['optimizer_gb']:.2f} + discriminator {s['discriminator_gb']:.2f} + buffers {s['buffers_gb']:.2f} = "
          f"{s['total_gb']:.2f} GB (DeepSpeed's estimator: {s['deepspeed_estimator_gb']:.2f} GB)")
    print(f"{'mb':>4} {'tokenizer':>10} {'quantizer':>10} {'llm':>8} {'lm_head':>8} {'total':>8}  fits")
    for r in pl["micro_batches"]:
        print(f"{r['micro_batch']:>4} {r['tokenizer_gb']:>10.2f} {r['quantizer_gb']:>10.2f} {r['llm_gb']:>8.2f} "
              f"{r['lm_head_gb']:>8.2f} {r['step_total_gb']:>8.2f}  {'yes' if r['fits'] else 'no'}")
    print(f"largest micro-batch that fits 90%: {pl['largest_fitting_micro_batch']}")


def compare(path: Path, cfg, p, act, seq_full, image_tokens) -> list[dict]:
    """Estimate vs torch.cuda.max_memory_allocated of a step bench's results.jsonl (engine variants, 1 GPU)."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("peak_mem_kind") != "cuda_max_memory_allocated" or r.get("variant") != "ett" or r.get("overrides"):
            continue
        pl = plan(cfg, p, act, 1, 141.0, r.get("seq_len") or seq_full, image_tokens)
        est = next((x["step_total_gb"] for x in pl["micro_batches"] if x["micro_batch"] == r["micro_batch"]), None)
        measured = r["peak_mem_gib"] * 2 ** 30 / GB
        out.append({"variant": "memory_plan_check", "tag": r.get("tag"), "micro_batch": r["micro_batch"],
                    "estimate_gb": est, "measured_gb": round(measured, 2),
                    "estimate_over_measured": round(est / measured, 3) if est else None})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="qwen2.5-1.5b-ibq", help="a recipe, or a step_bench preset (h200-1.5b)")
    ap.add_argument("--preset", help="shorthand for --recipe PRESET")
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--gpu-gb", type=float, nargs="*", default=[80.0, 141.0])
    ap.add_argument("--seq-len", type=int, default=None,
                    help="LLM sequence length (default: image tokens + data.max_text_tokens + 32 for bos, prompt, "
                         "image delimiters and eos; a step_bench preset's seq_len)")
    ap.add_argument("--measure-side", type=int, default=128, help="image side of the CPU tokenizer measurement")
    ap.add_argument("--measure-seq", type=int, default=256, help="sequence length of the CPU LLM-layer measurement")
    ap.add_argument("--measure-tokens", default="256,1024", help="two token counts for the CPU quantizer measurement")
    ap.add_argument("--compare", type=Path, help="a step bench results.jsonl: estimate vs cuda max_memory_allocated")
    ap.add_argument("--json", action="store_true", help="one JSON line per plan instead of tables")
    ap.add_argument("--save", type=Path, help="write the parameters and CPU measurements to this JSON file")
    ap.add_argument("--measured", type=Path, help="reuse the measurements of a --save file instead of measuring")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    a = ap.parse_args()
    if not a.measured and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # every allocation above 64 KiB gets its own mapping, returned on free: RSS then follows the live tensors
        # (glibc would otherwise keep freed memory in its arenas, and a second measurement would not grow RSS)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    cfg, preset = build_config(a.preset or a.recipe, a.overrides)
    down = cfg.downsample
    image_tokens = (cfg.data.image_size[0] // down) * (cfg.data.image_size[1] // down)
    seq_full = a.seq_len or (preset or {}).get("seq_len") or image_tokens + cfg.data.max_text_tokens + 32
    p = count_params(cfg, vocab=int((cfg.model.llm.init_config or {}).get("vocab_size", 151936)))
    if a.measured:  # activations measured earlier (e.g. on a CPU machine, before a GPU run)
        act = json.loads(a.measured.read_text())["measured"]
    else:
        t = [int(x) for x in a.measure_tokens.split(",")]
        act = measure_activations(cfg, p, a.measure_side, min(a.measure_seq, seq_full), (t[0], t[1]))
    head = {"recipe": cfg.name, "stage": cfg.stage, "image_size": cfg.data.image_size, "image_tokens": image_tokens,
            "seq_len": seq_full, "params": p, "measured": act, "recipe_micro_batch": cfg.train.micro_batch_size}
    print(json.dumps(head) if a.json else f"# memory plan: {json.dumps(head)}")
    if a.save:
        a.save.write_text(json.dumps(head, indent=1) + "\n")
    if a.compare:
        for row in compare(a.compare, cfg, p, act, seq_full, image_tokens):
            print(json.dumps(row))
        return 0
    for g in a.gpus:
        for cap in a.gpu_gb:
            pl = plan(cfg, p, act, g, cap, seq_full, image_tokens)
            print(json.dumps(pl)) if a.json else print_plan(pl)
    return 0


if __name__ == "__main__":
    sys.exit(main())

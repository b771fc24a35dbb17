"""Timing (median, p10, p90 of synchronised steps), peak memory, the device, and the LLM FLOPs of one step."""
from __future__ import annotations

import gc
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path


def emit(row: dict, out_file: Path | None) -> None:
    line = json.dumps(row, sort_keys=False)
    print(line, flush=True)
    if out_file is not None:
        with open(out_file, "a") as fh:
            fh.write(line + "\n")


def log(msg: str) -> None:
    print(f"[step_bench] {msg}", file=sys.stderr, flush=True)


def quantile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_stats(times: list[float]) -> dict:
    s = sorted(times)
    return {"s_per_step": statistics.median(s), "s_p10": quantile(s, 0.1), "s_p90": quantile(s, 0.9),
            "steps_timed": len(s)}


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak(device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> dict:
    import torch
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "peak_mem_kind": "cuda_max_memory_allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_mem_kind": "process_max_rss"}


def pick_device():
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"



def llm_flops(llm, batch: dict, llm_trains: bool) -> dict:
    """Model FLOPs of the LLM for one step (see the module docstring)."""
    n = sum(int(getattr(p, "ds_numel", p.numel())) for p in llm.parameters())
    layers, d = int(llm.config.num_hidden_layers), int(llm.config.hidden_size)
    seq = int(batch["input_ids"].shape[1])
    tokens = int(batch["attention_mask"].sum())
    c = 6 if llm_trains else 4
    return {"llm_params": n, "seq_len": seq, "tokens_per_step": tokens,
            "llm_flops_per_step": float(tokens) * (c * n + c * 2 * layers * d * seq),
            "flops_factor": c}


def throughput(row: dict, samples: int, ceiling: float | None) -> dict:
    s = row["s_per_step"]
    row["samples_per_s"] = samples / s
    if "tokens_per_step" in row:
        row["tokens_per_s"] = row["tokens_per_step"] / s
    if "llm_flops_per_step" in row:
        row["llm_tflops"] = row["llm_flops_per_step"] / s / 1e12
        row["mfu"] = (row["llm_flops_per_step"] / s / ceiling) if ceiling else None
    return row



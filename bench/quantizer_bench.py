"""The K-wide parts of a training step, before and after chunking (issue 12): peak memory growth and time of one
forward + backward of the IBQ quantizer and of the visual-code head, each variant in its own child process.

    OMP_NUM_THREADS=2 python bench/quantizer_bench.py                # issue 12's shapes: N = 2,048 and 8,192 tokens
    python bench/quantizer_bench.py --tokens 256,1024 --codebook 16384 --repeats 1   # smaller
    python bench/quantizer_bench.py --no-grad [--tokens 256]         # the no-grad quantizer, losses on vs off

Variants (one JSON line each):
  ibq_unchunked  the quantizer's formula before issue 12 (every N x K tensor kept for backward), written out here
  ibq_chunked    ett_ds's IBQuantizer (chunked.IBQChunked, chunk from model.tokenizer.quantizer_chunk_tokens' budget)
  head_unchunked caption_loss(F.linear(h, W), targets): the t2i visual head before issue 12
  head_chunked   losses.linear_cross_entropy (CodeHead's loss)
  ibq_time_pair  both quantizer variants timed alternately in one process: the time ratio of record
The loss is z_q . g + quant + 0.05 entropy (quantizer) or the head's mean CE, backward to the encoder output / hidden
states and to the codebook / head weight. "growth" is the child's peak RSS during the first forward + backward minus
its RSS just before (after the inputs and parameters exist; the peak is reset through /proc/self/clear_refs), in GB
(1e9 bytes); the time is the median of --repeats further runs (the pair: --repeats alternations after a warm-up). Unchunked variants whose N x K tensors would not fit
--max-unchunked-gb are skipped. The last line holds the growths and the chunked/unchunked time ratios against issue
12's targets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ett_ds.models import losses  # noqa: E402
from ett_ds.tokenizers.ibq import IBQuantizer, reference_quantize  # noqa: E402

TARGETS = {"ibq_growth_gb@2048": 1.0, "ibq_growth_gb@8192": 2.0, "ibq_time_ratio@2048": 1.35,
           "head_growth_gb@8192": 1.0}


# -- the formulas before issue 12 (what "unchunked" measures) --------------------------------------------------------

def unchunked_ibq(zf, codebook, beta=0.25, temperature=0.01):
    z_q, _, quant, ent = reference_quantize(zf, codebook, beta, temperature)
    return z_q, quant, ent


# -- one variant in this process ---------------------------------------------------------------------------------------

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_step(variant: str, n: int, a):
    torch.manual_seed(0)
    if variant.startswith("ibq"):
        q = IBQuantizer(a.codebook, a.dim, init_std=1.0, chunk_tokens=a.chunk or None)
        z = torch.randn(n, a.dim, requires_grad=True)
        g = torch.randn(n, a.dim)

        def step():
            q.embedding.weight.grad, z.grad = None, None
            if variant == "ibq_chunked":
                z_q, _, terms = q(z.t().reshape(1, a.dim, 1, n))
                quant, ent = terms["quant"], terms["entropy"]
                z_q = z_q.reshape(a.dim, n).t()
            else:
                z_q, quant, ent = unchunked_ibq(z, q.embedding.weight)
            ((z_q * g).sum() + quant + 0.05 * ent).backward()
        return step, {"chunk_tokens": q.chunk_tokens if variant == "ibq_chunked" else None}
    w = torch.nn.Parameter(torch.randn(a.codebook, a.hidden) * 0.02)
    h = torch.randn(n, a.hidden, requires_grad=True)
    t = torch.randint(0, a.codebook, (n,))

    def step():
        w.grad, h.grad = None, None
        if variant == "head_chunked":
            loss = losses.linear_cross_entropy(h, w, t, a.chunk or None)
        else:
            loss = losses.caption_loss(F.linear(h, w), t)
        loss.backward()
    from ett_ds.tokenizers.chunked import auto_chunk_tokens
    return step, {"chunk_tokens": (a.chunk or auto_chunk_tokens(a.codebook, 3)) if variant == "head_chunked" else None}


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def run_pair(n: int, a) -> dict:
    """ibq_unchunked and ibq_chunked timed alternately in one process (fair under a changing machine load)."""
    steps = {v: _make_step(v, n, a)[0] for v in ("ibq_unchunked", "ibq_chunked")}
    times = {v: [] for v in steps}
    for v, step in steps.items():
        step()  # warm-up
    for _ in range(a.pair_repeats):
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)
    med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    low = {v: min(ts) for v, ts in times.items()}
    return {"variant": "ibq_time_pair", "tokens": n, "codebook": a.codebook, "dim": a.dim,
            "unchunked_s": round(med["ibq_unchunked"], 6), "chunked_s": round(med["ibq_chunked"], 6),
            "ratio": round(med["ibq_chunked"] / med["ibq_unchunked"], 3),
            "ratio_of_fastest": round(low["ibq_chunked"] / low["ibq_unchunked"], 3),
            "times_s": {v: [round(t, 3) for t in ts] for v, ts in times.items()},
            "repeats": a.pair_repeats, "threads": torch.get_num_threads(), "loadavg": _loadavg()}


def run_one(variant: str, n: int, a) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if variant == "ibq_time_pair":
        return run_pair(n, a)
    step, extra = _make_step(variant, n, a)
    before = _rss_bytes("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    s = sorted(times)[len(times) // 2] if times else first
    return {"variant": variant, "tokens": n, "codebook": a.codebook, "dim": a.dim if variant.startswith("ibq") else None,
            "hidden": a.hidden if variant.startswith("head") else None, **extra,
            "growth_gb": round((peak - before) / 1e9, 3), "rss_before_gb": round(before / 1e9, 3),
            "peak_reset": reset, "nk_fp32_copy_gb": round(n * a.codebook * 4 / 1e9, 3), "first_s": round(first, 6),
            "s": round(s, 6), "repeats": a.repeats, "threads": torch.get_num_threads()}


# -- the driver: each variant in a child process -----------------------------------------------------------------------

def child(variant: str, n: int, a) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(n), "--codebook", str(a.codebook),
           "--dim", str(a.dim), "--hidden", str(a.hidden), "--repeats", str(a.repeats), "--chunk", str(a.chunk),
           "--pair-repeats", str(a.pair_repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        return {"variant": variant, "tokens": n, "error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def summary(rows: list[dict]) -> dict:
    by = {(r["variant"], r["tokens"]): r for r in rows if "growth_gb" in r}
    out = {}
    for v in ("ibq", "head"):
        for n in sorted({k[1] for k in by}):
            c, u = by.get((f"{v}_chunked", n)), by.get((f"{v}_unchunked", n))
            if c:
                out[f"{v}_growth_gb@{n}"] = c["growth_gb"]
            if c and u:
                out[f"{v}_growth_ratio@{n}"] = round(c["growth_gb"] / max(u["growth_gb"], 1e-9), 3)
                out[f"{v}_time_ratio@{n}"] = round(c["s"] / max(u["s"], 1e-9), 3)
            pair = next((r for r in rows if r["variant"] == f"{v}_time_pair" and r["tokens"] == n), None)
            if pair is not None and "ratio" in pair:  # the alternating timing, when it ran, is the ratio of record
                out[f"{v}_time_ratio@{n}"] = pair["ratio"]
    checks = {k: {"value": out[k], "target": t, "ok": out[k] <= t} for k, t in TARGETS.items() if k in out}
    return {"summary": out, "targets": checks, "all_ok": all(c["ok"] for c in checks.values()) if checks else None}


def no_grad_bench(a) -> int:
    """The no-grad quantizer: full forward (softmax, entropy, straight-through) vs ``losses=False``."""
    dev = torch.device(a.device)
    q = IBQuantizer(a.codebook, a.dim, init_std=1.0).to(dev)
    n = int(a.tokens.split(",")[0])
    z = torch.randn(1, a.dim, 1, n, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def median(fn):
        fn()
        ts = []
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]
    with torch.no_grad():
        full, fast = median(lambda: q(z, True)), median(lambda: q(z, False))
    print(json.dumps({"bench": "ibq_no_grad", "device": dev.type, "codebook": a.codebook, "dim": a.dim, "tokens": n,
                      "with_losses_ms": round(full * 1e3, 2), "losses_false_ms": round(fast * 1e3, 2),
                      "ratio": round(full / fast, 2)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="2048,8192", help="comma-separated N (visual tokens per step)")
    ap.add_argument("--codebook", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=256, help="code dimension D")
    ap.add_argument("--hidden", type=int, default=1536, help="LLM hidden size feeding the visual head")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the measured one")
    ap.add_argument("--pair-repeats", type=int, default=3, help="alternations timed by ibq_time_pair")
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: the automatic default)")
    ap.add_argument("--variants", default="ibq_unchunked,ibq_chunked,ibq_time_pair,head_unchunked,head_chunked")
    ap.add_argument("--max-unchunked-gb", type=float, default=8.0,
                    help="skip an unchunked variant whose N x K fp32 tensors (about 6 copies) would pass this")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant here
    ap.add_argument("--no-grad", action="store_true", help="the no-grad timing instead (first --tokens value)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--no-grad only")
    a = ap.parse_args()
    if a.no_grad:
        return no_grad_bench(a)
    if a.variant:
        print(json.dumps(run_one(a.variant, int(a.tokens), a)))
        return 0
    rows = []
    for n in (int(t) for t in a.tokens.split(",")):
        for v in a.variants.split(","):
            if v.endswith(("unchunked", "pair")) and 6 * n * a.codebook * 4 / 1e9 > a.max_unchunked_gb:
                row = {"variant": v, "tokens": n, "skipped": f"about {6 * n * a.codebook * 4 / 1e9:.0f} GB of N x K "
                       f"tensors > --max-unchunked-gb {a.max_unchunked_gb:g}"}
            else:
                row = child(v, n, a)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

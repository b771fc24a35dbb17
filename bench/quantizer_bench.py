"""The IBQ quantizer without gradients: full forward (softmax, entropy, straight-through) against ``losses=False``
(argmax and gather only), timed in one run; prints one JSON line with both times and their ratio.

    OMP_NUM_THREADS=2 python bench/quantizer_bench.py [--codebook 131072] [--dim 256] [--tokens 256] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ett_ds.models.vq import IBQuantizer  # noqa: E402


def median_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codebook", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256, help="visual tokens (256 = one 256x256 image at 16x)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    q = IBQuantizer(a.codebook, a.dim, init_std=1.0).to(dev)
    z = torch.randn(1, a.dim, 1, a.tokens, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        full = median_time(lambda: q(z, True), a.repeats, sync)
        fast = median_time(lambda: q(z, False), a.repeats, sync)
    print(json.dumps({"bench": "ibq_no_grad", "device": dev.type, "codebook": a.codebook, "dim": a.dim,
                      "tokens": a.tokens, "with_losses_ms": round(full * 1e3, 2),
                      "losses_false_ms": round(fast * 1e3, 2), "ratio": round(full / fast, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

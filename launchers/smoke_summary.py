"""Prints the smoke test's summary table from the run folders it produced (used by launchers/smoke_test.sh)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    runs_dir, eval_json = Path(argv[0]), Path(argv[1])
    stages = argv[2:]
    print("\n| stage | steps | first loss | last loss | main term (first -> last) | samples/s | codebook usage |")
    print("|---|---|---|---|---|---|---|")
    for name in stages:
        r = rows(runs_dir / name)
        if not r:
            print(f"| {name} | (no metrics) | | | | | |")
            continue
        a, b = r[0], r[-1]
        key = next((k for k in ("loss_t2i", "loss_cap", "loss_vq") if b.get(k) is not None), "loss")
        sps = sum(x["samples_per_s"] for x in r[1:] or r) / max(1, len(r[1:] or r))
        print(f"| {name} | {b['step']} | {fmt(a['loss'])} | {fmt(b['loss'])} | {key}: {fmt(a.get(key))} -> "
              f"{fmt(b.get(key))} | {sps:.1f} | {fmt(b.get('codebook_usage'), '.2f')} |")
    if eval_json.is_file():
        m = json.loads(eval_json.read_text())
        print("\nEvaluation on the held-out split:")
        for k, v in sorted(_flat(m).items()):
            if isinstance(v, (int, float)):
                print(f"  {k:32s} {v:.4g}")
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

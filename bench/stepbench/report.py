"""The engine/reference ratio row, the matmul ceiling of an earlier run, and the results table."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .measure import log


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


def ceiling_from(path: Path) -> float | None:
    best = None
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if row.get("variant") == "matmul" and row.get("ceiling_flops"):
                    best = float(row["ceiling_flops"])
    if best is None:
        log(f"no matmul line in {path}: MFU will be null")
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



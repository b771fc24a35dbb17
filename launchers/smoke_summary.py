"""Prints the smoke test's summary: a table of every stage's training losses, then one verdict per capability
measured on held-out images (used by launchers/smoke_test.sh).

    python launchers/smoke_summary.py RUNS_DIR --stages tok align ett sft t2i \
        --eval-tok tok.json --eval-ett ett.json --eval-sft sft.json --eval-t2i t2i.json [--json verdicts.json]

The eval files are ``python -m ett_ds.evaluate`` outputs. Verdicts (thresholds: see ``THRESHOLDS``):
- reads: caption exact match of the final understanding checkpoint (sft; stage 2's ETT checkpoint on the line
  below it) on held-out images, next to chance (the
  best constant answer: the share of the most frequent held-out caption) and the distinct-caption ratio (distinct
  predictions / distinct references); "captions ignore the image" when that ratio is low;
- reconstructs: OCR character error rate on reconstructions by the tokenizer after stage 0 and after ETT, next to
  the OCR CER of the original images (the reader's own ceiling);
- draws: the share of held-out prompts whose generated image the OCR reader reads back as exactly the prompt;
- generalises: the same per held-out font family (``by_group`` of the eval files: the demo holds out whole font
  collections, Liberation and URW Gothic, never rendered in training): the worst family's caption exact match (sft)
  and the worst family's OCR CER on ETT's reconstructions.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

THRESHOLDS = {"reads_em": 0.5, "reads_diversity": 0.5, "ignores_image_diversity": 0.2,
              "reconstructs_ocr_cer": 0.3, "draws_readback": 0.3, "family_em": 0.7, "family_ocr_cer": 0.15}


def rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    out = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [r for r in out if "loss" in r]  # evaluation rows carry "eval" instead


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def load(path: str | None) -> dict:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}


def loss_table(runs_dir: Path, stages: list[str]) -> list[str]:
    out = ["| stage | steps | first loss | last loss | main term (first -> last) | samples/s | codebook usage |",
           "|---|---|---|---|---|---|---|"]
    for name in stages:
        r = rows(runs_dir / name)
        if not r:
            out.append(f"| {name} | (no metrics) | | | | | |")
            continue
        a, b = r[0], r[-1]
        key = next((k for k in ("loss_t2i", "loss_cap", "loss_vq") if b.get(k) is not None), "loss")
        rest = r[1:] or r
        sps = sum(x.get("samples_per_s", 0.0) for x in rest) / len(rest)
        out.append(f"| {name} | {b['step']} | {fmt(a['loss'])} | {fmt(b['loss'])} | {key}: {fmt(a.get(key))} -> "
                   f"{fmt(b.get(key))} | {sps:.1f} | {fmt(b.get('codebook_usage'), '.2f')} |")
    return out


def read_verdict(ev: dict, samples: list[dict]) -> dict:
    cap = ev.get("caption") or {}
    if "exact_match" not in cap:
        return {"ok": False, "line": "reads:        no caption evaluation"}
    refs = [s["ref"] for s in samples if "caption" in s]
    hyps = [s["caption"] for s in samples if "caption" in s]
    chance = max(Counter(refs).values()) / len(refs) if refs else None
    diversity = len(set(hyps)) / max(1, len(set(refs))) if refs else cap.get("diversity")
    em = cap["exact_match"]
    ok = em >= THRESHOLDS["reads_em"] and (diversity or 0) >= THRESHOLDS["reads_diversity"]
    line = (f"reads:        {'PASS' if ok else 'FAIL'}  held-out caption exact match {em:.1%} (chance {fmt(chance, '.1%')}, "
            f"goal >= {THRESHOLDS['reads_em']:.0%}); distinct captions {len(set(hyps))} for {len(set(refs))} "
            f"distinct references (ratio {fmt(diversity, '.2f')})")
    if diversity is not None and diversity < THRESHOLDS["ignores_image_diversity"]:
        line += "  <- captions ignore the image"
    return {"ok": ok, "line": line, "exact_match": em, "chance": chance, "diversity": diversity}


def reconstruct_verdict(tok: dict, ett: dict) -> dict:
    r0, r2 = tok.get("recon") or {}, ett.get("recon") or {}
    if "ocr_cer_recon" not in r0 and "ocr_cer_recon" not in r2:
        return {"ok": False, "line": "reconstructs: no OCR scoring of reconstructions (is RapidOCR installed?)"}
    cers = [r.get("ocr_cer_recon") for r in (r0, r2) if r.get("ocr_cer_recon") is not None]
    ok = bool(cers) and max(cers) <= THRESHOLDS["reconstructs_ocr_cer"]
    orig = r0.get("ocr_cer_original", r2.get("ocr_cer_original"))
    line = (f"reconstructs: {'PASS' if ok else 'FAIL'}  OCR CER on reconstructions {fmt(r0.get('ocr_cer_recon'))} "
            f"after stage 0, {fmt(r2.get('ocr_cer_recon'))} after ETT (originals {fmt(orig)}, goal <= "
            f"{THRESHOLDS['reconstructs_ocr_cer']}); PSNR {fmt(r0.get('psnr'), '.2f')} -> {fmt(r2.get('psnr'), '.2f')} dB")
    return {"ok": ok, "line": line, "ocr_cer_stage0": r0.get("ocr_cer_recon"), "ocr_cer_ett": r2.get("ocr_cer_recon"),
            "ocr_cer_original": orig}


def draw_verdict(ev: dict) -> dict:
    t2i = ev.get("t2i") or {}
    items = [x for x in t2i.get("samples", []) if x.get("ocr") is not None]
    if not items:
        return {"ok": False, "line": "draws:        no OCR-scored generations"}
    hits = sum(" ".join(str(x["ocr"]).split()) == " ".join(str(x["prompt"]).split()) for x in items)
    rate = hits / len(items)
    ok = rate >= THRESHOLDS["draws_readback"]
    line = (f"draws:        {'PASS' if ok else 'FAIL'}  the OCR reader reads back the prompt from {hits}/{len(items)} "
            f"images generated for held-out prompts ({rate:.0%}; chance ~0%, goal >= "
            f"{THRESHOLDS['draws_readback']:.0%}); OCR CER {fmt(t2i.get('ocr_cer'))}")
    return {"ok": ok, "line": line, "readback": rate, "num": len(items)}


def family_verdict(sft: dict, ett: dict) -> dict:
    reads = (sft.get("caption") or {}).get("by_group") or {}
    recon = (ett.get("recon") or {}).get("by_group") or {}
    if not reads:
        return {"ok": False, "line": "generalises:  no per-family caption scores (eval data without a family field)"}
    ems = {f: v["exact_match"] for f, v in reads.items()}
    cers = {f: v["ocr_cer_recon"] for f, v in recon.items() if v.get("ocr_cer_recon") is not None}
    worst_em = min(ems, key=ems.get)
    worst_cer = max(cers, key=cers.get) if cers else None
    ok = ems[worst_em] >= THRESHOLDS["family_em"] and (worst_cer is None or
                                                        cers[worst_cer] <= THRESHOLDS["family_ocr_cer"])
    line = (f"generalises:  {'PASS' if ok else 'FAIL'}  per held-out font family, caption exact match "
            + ", ".join(f"{f} {v:.0%} (n={reads[f]['n']})" for f, v in sorted(ems.items()))
            + f" (goal >= {THRESHOLDS['family_em']:.0%} each)")
    if cers:
        line += ("; OCR CER of ETT's reconstructions " + ", ".join(f"{f} {v:.3f}" for f, v in sorted(cers.items()))
                 + f" (goal <= {THRESHOLDS['family_ocr_cer']} each)")
    return {"ok": ok, "line": line, "exact_match": ems, "ocr_cer_ett": cers}


def samples_of(path: str | None) -> list[dict]:
    if not path:
        return []
    f = Path(path)
    f = f.with_name(f.stem + "_samples.jsonl")
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir")
    ap.add_argument("--stages", nargs="+", default=[])
    ap.add_argument("--eval-tok")
    ap.add_argument("--eval-ett")
    ap.add_argument("--eval-sft")
    ap.add_argument("--eval-t2i")
    ap.add_argument("--eval-vqa", help="evaluate --tasks vqa output: printed for information (no verdict)")
    ap.add_argument("--json", help="also write the verdicts here")
    a = ap.parse_args(argv)
    print("\n" + "\n".join(loss_table(Path(a.runs_dir), a.stages)))
    verdicts = {"reads": read_verdict(load(a.eval_sft), [s for s in samples_of(a.eval_sft) if "caption" in s]),
                "reads_ett": read_verdict(load(a.eval_ett), [s for s in samples_of(a.eval_ett) if "caption" in s]),
                "reconstructs": reconstruct_verdict(load(a.eval_tok), load(a.eval_ett)),
                "draws": draw_verdict(load(a.eval_t2i)),
                "generalises": family_verdict(load(a.eval_sft), load(a.eval_ett))}
    print("\nVerdicts on held-out images (fonts and strings never seen in training):")
    verdicts["reads_ett"]["line"] = verdicts["reads_ett"]["line"].replace("reads:       ", "  (stage 2) ", 1)
    for key in ("reads", "reads_ett", "reconstructs", "draws", "generalises"):
        if key != "reads_ett" or "no caption" not in verdicts[key]["line"]:
            print("  " + verdicts[key]["line"])
    vqa = load(a.eval_vqa).get("vqa")
    if vqa:
        print(f"  (info)       VQA accuracy {vqa['accuracy']:.1%} on {vqa['num_questions']} held-out questions about the "
              "digits; the sft stage trains on captions only, so this is zero-shot")
    if a.json:
        Path(a.json).write_text(json.dumps(verdicts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

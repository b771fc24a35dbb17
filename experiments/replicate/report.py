"""Tables with intervals, goal checks, the EM-vs-ΔPSNR picture and the stage-0 curve."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import arms as A
from .stages import metrics_rows, train_curve
from .stats import arm_stats, fmt, paired_difference, per_image

DYNAMICS = ("code_drift", "grad_ratio")


def dynamics(run_dir: Path) -> dict:
    """Median, mean and last-100-step mean of the per-step tokenizer diagnostics, where the trainer logged them."""
    out = {}
    for key in DYNAMICS:
        vals = [float(r[key]) for r in metrics_rows(run_dir)
                if "eval" not in r and isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"median": float(np.median(vals)), "mean": float(np.mean(vals)),
                        "first": vals[0], "last": vals[-1], "n": len(vals)}
    return out


def final_table(arms: list[A.Arm], samples: dict[str, list[Path]], s0_samples: Path, runs: Path,
                seeds: list[int]) -> dict:
    """Per arm: bootstrap stats over its seeds and images, caption loss at the end, tokenizer dynamics; paired
    differences against frozen; goal checks."""
    s0 = per_image(s0_samples, None)["psnr"]
    per = {a.name: [per_image(p, list(s0)) for p in samples[a.name]] for a in arms}
    table = {"stage0_psnr": float(s0.mean()), "arms": {}}
    for a in arms:
        n = len(per[a.name])
        caps = [train_curve(runs / a.run(s), "loss_cap") for s in seeds[:n]]
        table["arms"][a.name] = {
            "label": a.label, "visual_input": a.visual_input, "tuned": a.tuned, "alpha": a.alpha,
            "tok_lr_ratio": a.tok_lr_ratio, "llm_init": a.llm_init, "stats": arm_stats(per[a.name]),
            "psnr": float(np.mean([d["psnr"].mean() for d in per[a.name]])),
            "em_per_seed": [float(d["em"].mean()) for d in per[a.name]],
            "final_loss_cap": [c[max(c)] for c in caps if c],
            "dynamics": [dynamics(runs / a.run(s)) for s in seeds[:n]] if a.tuned else []}
    for a in arms:
        ref = "text_frozen" if a.llm_init == "text" else "frozen"
        if a.name != ref and ref in per:
            table["arms"][a.name]["em_minus_frozen"] = paired_difference(per[a.name], per[ref], "em")
    # text-pretrained minus random LLM, arm by arm (paired by seed and image)
    table["text_minus_random_em"] = {a.name: paired_difference(per[a.name], per[a.name[5:]], "em")
                                     for a in arms if a.llm_init == "text" and a.name[5:] in per}
    return table


def goal_checks(table: dict, chosen: str, paper: str) -> dict:
    """Issue 16's goal for every ETT arm on the random LLM (the chosen one first, then the paper's alpha), against
    understanding-only at the same tokenizer lr when that arm was run."""
    arms = table["arms"]
    ett = [n for n, r in arms.items() if r["tuned"] and r["alpha"]]
    out = {}
    pre = lambda n: "text_" if arms[n]["llm_init"] == "text" else ""  # noqa: E731
    for name in sorted(ett, key=lambda n: (arms[n]["llm_init"] != "random", n[len(pre(n)):] != chosen,
                                           n[len(pre(n)):] != paper)):
        if "em_minus_frozen" not in arms[name]:
            continue
        d, st = arms[name]["em_minus_frozen"], arms[name]["stats"]
        und = A.ett(0.0, arms[name]["tok_lr_ratio"], arms[name]["llm_init"]).name
        und_gain = arms[und]["em_minus_frozen"]["mean"] if und in arms and "em_minus_frozen" in arms[und] else None
        base = name[len(pre(name)):]
        g = {"arm": name, "role": "chosen" if base == chosen else "paper alpha" if base == paper else "reported",
             "em_minus_frozen_points": round(100 * d["mean"], 1),
             "interval_points": [round(100 * d["lo"], 1), round(100 * d["hi"], 1)],
             "ge_10_points": d["mean"] >= 0.10, "interval_excludes_0": d["lo"] > 0, "und_only_arm": und,
             "und_only_gain_points": None if und_gain is None else round(100 * und_gain, 1),
             "ge_half_und_gain": None if und_gain is None else d["mean"] >= 0.5 * und_gain,
             "dpsnr_db": round(st["dpsnr"]["mean"], 3), "dpsnr_ge_-0.3": st["dpsnr"]["mean"] >= -0.3}
        g["met"] = bool(g["ge_10_points"] and g["interval_excludes_0"] and g["ge_half_und_gain"]
                        and g["dpsnr_ge_-0.3"])
        out[name] = g
    return out


def _g(v) -> str:
    return "-" if v is None else f"{v:g}"


def _rows(table: dict) -> list[str]:
    lines = ["| arm | LLM | α | tok lr / LLM lr | EM % [95 %] | CER [95 %] | ΔPSNR dB [95 %] | EM − frozen, points "
             "[95 %] | seeds × images | code drift (median) | grad ratio cap/vq (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in table["arms"].items():
        st = r["stats"]
        dyn = [d for d in r["dynamics"] if d]
        drift = np.median([d["code_drift"]["median"] for d in dyn if "code_drift" in d]) if dyn else None
        ratio = np.median([d["grad_ratio"]["median"] for d in dyn if "grad_ratio" in d]) if dyn else None
        lines.append(
            f"| {name} | {r['llm_init']} | {_g(r['alpha'])} | {_g(r['tok_lr_ratio'])} | "
            f"{fmt(st.get('em'), 100)} | {fmt(st.get('cer'), 1, 3)} | {fmt(st.get('dpsnr'), 1, 2, True)} | "
            f"{fmt(r.get('em_minus_frozen'), 100, 1, True)} | {st['em']['seeds']} × {st['em']['images']} | "
            f"{'-' if drift is None or np.isnan(drift) else f'{drift:.2e}'} | "
            f"{'∞ (α 0)' if r['alpha'] == 0 else '-' if ratio is None or np.isnan(ratio) else f'{ratio:.3g}'} |")
    return lines


def markdown(summary: dict) -> str:
    lines = [f"# ETT ablation with seeds, size `{summary['size']}`", "", f"Command: `{summary['command']}`  ",
             f"Wall time: {summary.get('wall_s', 0):.0f} s; seeds {summary['seeds']}", "",
             f"Fonts: train {len(summary['fonts']['train'])} ({summary['fonts']['train'][0]} ...), validation "
             f"{', '.join(summary['fonts']['val'])}, held-out {', '.join(summary['fonts']['heldout'])}; "
             "validation and held-out captions come from the held-out string bucket, split again in two.", ""]
    if summary.get("shared_family"):
        lines += [f"**Warning: validation and held-out share the type family {', '.join(summary['shared_family'])} "
                  "with training (--allow-shared-family); held-out is not another family.**", ""]
    s0 = summary.get("stage0")
    if s0:
        pts = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(s0["curve"].items()))
        lines += [f"Stage 0: stopped at step {s0['stopped_at']}; validation PSNR gain over the last {s0['window']} "
                  f"steps {s0['last_gain_db'] if s0['last_gain_db'] is None else round(s0['last_gain_db'], 3)} dB "
                  f"(converged below {s0['tol_db']} dB: {'yes' if s0['converged'] else 'no'}). Curve (step: dB): "
                  f"{pts}."]
        if s0.get("cooldown_curve"):
            cool = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(s0["cooldown_curve"].items()))
            lines += [f"Then {s0['cooldown']} steps with the lr decaying to 0 (cosine), the tokenizer every arm "
                      f"starts from: {cool}."]
        lines.append("")
    if summary.get("grid"):
        g = summary["grid"]
        lines += ["## Grid at the first seed, validation split", "", *_rows(g), "",
                  f"Selection: {g['selection']['rule']}; chosen **{g['selection']['chosen']}**"
                  + (" (no cell was eligible: best EM overall)" if g["selection"]["fallback_no_cell_eligible"]
                     else "") + ".", ""]
    if summary.get("final"):
        f = summary["final"]
        lines += ["## Reported arms, held-out split", "", f"Stage-0 held-out PSNR {f['stage0_psnr']:.2f} dB.", "",
                  *_rows(f), ""]
        for g in summary.get("goal", {}).values():
            lines.append(f"- Goal, {g['arm']} ({g['role']}): EM − frozen {g['em_minus_frozen_points']} points "
                         f"{g['interval_points']} (≥ 10: {g['ge_10_points']}; interval excludes 0: "
                         f"{g['interval_excludes_0']}; ≥ half of {g['und_only_arm']}'s {g['und_only_gain_points']}: "
                         f"{g['ge_half_und_gain']}); ΔPSNR {g['dpsnr_db']} dB (≥ −0.3: {g['dpsnr_ge_-0.3']}) → "
                         f"**{'met' if g['met'] else 'not met'}**")
        for name, diff in f.get("text_minus_random_em", {}).items():
            lines.append(f"- {name} − {name[5:]} (text-pretrained − random LLM): {fmt(diff, 100, 1, True)} "
                         "points EM")
    s1 = summary.get("stage1")
    if s1:
        steps = sorted({int(k) for v in s1.values() for k in v["points"]})
        lines += ["", "## Stage 1 alone (projector only, LLM frozen), held-out split, first seed", "",
                  "| LLM | " + " | ".join(f"EM % after {k} steps" for k in steps) + " | caption loss (first → last) |",
                  "|---|" + "---|" * (len(steps) + 1)]
        for llm, v in s1.items():
            pts = {int(k): p for k, p in v["points"].items()}
            loss = {int(k): x for k, x in v["loss_cap"].items()}
            ends = f"{loss[min(loss)]:.3f} → {loss[max(loss)]:.3f}" if loss else "-"
            lines.append(f"| {llm} | " + " | ".join(fmt(pts[k]['em'], 100) if k in pts else "-" for k in steps)
                         + f" | {ends} |")
        tp = summary.get("text_pretrain") or {}
        if tp.get("exact_match"):
            lines.append(f"\nText pretraining ({tp['plan'].get('corpus')}), exact match on its own held-in "
                         f"sequences: {tp['exact_match']}; {tp.get('seconds')} s.")
    t = summary.get("timings_s", {})
    lines += ["", "Seconds per stage trained or evaluated by this invocation (reused ones are not listed): "
              + ", ".join(f"{k} {v}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


def write(out: Path, summary: dict) -> None:
    from .plot import em_vs_dpsnr, stage0_curve
    f = summary.get("final")
    if f and summary.get("chosen"):
        c = summary["chosen"]
        chosen = A.ett(c["alpha"], c["ratio"]).name
        paper = A.ett(summary["paper_alpha"], c["ratio"]).name
        summary["goal"] = goal_checks(f, chosen, paper)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "results.md").write_text(markdown(summary))
    if summary.get("stage0"):
        stage0_curve(out / "stage0_curve.png", summary["stage0"])
    panels = [(title, t) for title, t in (("grid cells, validation split, first seed", summary.get("grid")),
                                          (f"reported arms, held-out split, seeds {summary['seeds']}", f)) if t]
    if panels:
        em_vs_dpsnr(out / "em_vs_dpsnr.png", panels)

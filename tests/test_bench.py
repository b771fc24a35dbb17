"""Smoke check of the step benchmark's CPU mode (bench/step_bench.py --preset cpu-tiny): every measurement line is
printed and parses, times are positive, and the last line is the engine/reference ratio. No timing assertions."""
import json
import sys
from pathlib import Path

import pytest

from tests.tiny import run_group, subprocess_env

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "step_bench.py"
EXPECTED = ["matmul", "loader", "reference", "ett", "align", "frozen"]


def _run(args, timeout=120):
    env = subprocess_env(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")  # the bench picks its own port
    return run_group([sys.executable, str(BENCH), *args], timeout, cwd=REPO, env=env)


def test_cpu_tiny_prints_every_measurement_and_a_ratio(tmp_path):
    rc, out, err = _run(["--preset", "cpu-tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0, f"exit {rc}; stderr tail:\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    names = [r["variant"] for r in rows]
    loader_ok = "loader" in names
    assert [n for n in names if n != "ratio"] == (EXPECTED if loader_ok else [v for v in EXPECTED if v != "loader"])
    assert names[-1] == "ratio" and names.count("ratio") == 1
    by = {r["variant"]: r for r in rows}
    for name in ("reference", "ett", "align", "frozen"):
        r = by[name]
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["s_p10"] > 0 and r["s_p90"] >= r["s_p10"], r
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["llm_tflops"] > 0, r
        assert r["mfu"] is not None and r["mfu"] > 0, r
        assert r["peak_mem_gib"] > 0 and r["steps_timed"] == 2, r
        assert r["tokens_per_step"] == r["micro_batch"] * r["seq_len"], r  # one fixed, pad-free shape
    assert by["ett"]["zero_stage"] == 3
    assert by["align"]["flops_factor"] == 4 and by["ett"]["flops_factor"] == 6
    assert by["matmul"]["ceiling_flops"] > 0
    if by["loader"].get("skipped"):
        assert by["loader"]["reason"]
    else:
        assert by["loader"]["samples_per_s"] > 0
    ratio = by["ratio"]
    assert ratio["engine_over_reference"] > 0
    assert ratio["engine_over_reference"] == pytest.approx(ratio["reference_s_per_step"] / ratio["engine_s_per_step"])
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == rows


def test_summarize_reads_the_results(tmp_path):
    rows = [{"variant": "matmul", "n": 8192, "tflops": 790.0, "ceiling_flops": 7.9e14, "s_per_matmul": 0.0014},
            {"variant": "ett", "micro_batch": 8, "s_per_step": 0.5, "s_p10": 0.49, "s_p90": 0.52,
             "samples_per_s": 16.0, "llm_tflops": 160.4, "mfu": 0.203, "peak_mem_gib": 60.0, "tag": "mb8"},
            {"variant": "ett", "error": "RuntimeError: boom", "tag": "zero2"},
            {"variant": "ratio", "engine_over_reference": 0.7, "target": 0.9}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _run(["--summarize", str(path)], timeout=60)
    assert rc == 0, err
    assert "0.5000" in out and "20.3" in out and "RuntimeError: boom" in out and "engine/reference = 0.700" in out


@pytest.mark.parametrize("content", ["photo", "noise"])
def test_loader_bench_prints_both_ratios(content):
    """bench/loader_bench.py on a few images: every line parses and the summary holds both of issue 3's ratios."""
    env = subprocess_env(OMP_NUM_THREADS="1")
    rc, out, err = run_group([sys.executable, str(REPO / "bench" / "loader_bench.py"), "--num", "12", "--repeats", "1",
                              "--src", "96x64", "--size", "32x32", "--content", content], 120, cwd=REPO, env=env)
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rows[0]["setup"]["images"] == 12 and rows[0]["setup"]["content"] == content
    summary = rows[-1]["summary"]
    assert set(summary) == {"loader_ratio_full_decode", "loader_ratio_jpeg_draft", "shard_ratio"}
    assert all(v > 0 for v in summary.values())


def test_quantizer_bench_no_grad_prints_its_ratio():
    rc, out, err = run_group([sys.executable, str(REPO / "bench" / "quantizer_bench.py"), "--no-grad", "--codebook",
                              "64", "--dim", "8", "--tokens", "4", "--repeats", "1", "--device", "cpu"], 60, cwd=REPO,
                             env=subprocess_env(OMP_NUM_THREADS="1"))
    assert rc == 0, err[-2000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["bench"] == "ibq_no_grad" and row["with_losses_ms"] > 0 and row["losses_false_ms"] > 0


def test_quantizer_memory_bench_runs_every_variant_in_a_child_and_ends_with_the_ratios():
    """Issue 12's bench at a toy shape: one line per variant (own process, peak RSS growth and time), skipped
    unchunked variants say why, and the last line holds the growths and chunked/unchunked ratios."""
    rc, out, err = run_group([sys.executable, str(REPO / "bench" / "quantizer_bench.py"), "--tokens", "64,2048",
                              "--codebook", "512", "--dim", "16", "--hidden", "32", "--repeats", "1",
                              "--max-unchunked-gb", "0.01"], 120, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert rc == 0, err[-2000:]
    rows = [json.loads(line) for line in out.strip().splitlines()]
    *variants, last = rows
    assert [(r["variant"], r["tokens"]) for r in variants] == [
        (v, n) for n in (64, 2048) for v in ("ibq_unchunked", "ibq_chunked", "ibq_time_pair", "head_unchunked", "head_chunked")]
    for r in variants:
        assert "error" not in r, r
        if r["tokens"] == 2048 and r["variant"].endswith(("_unchunked", "_pair")):
            assert "max-unchunked-gb" in r["skipped"]
        else:
            if r["variant"].endswith("_pair"):
                assert r["ratio"] > 0, r
            else:  # a memory variant: its time and its peak-RSS growth were measured (growth may be 0 at a toy size)
                assert r["s"] > 0 and r["growth_gb"] >= 0 and isinstance(r["peak_reset"], bool), r
    assert {"ibq_growth_gb@64", "ibq_time_ratio@64", "head_growth_gb@2048", "ibq_growth_gb@2048"} <= set(last["summary"])
    assert last["summary"]["ibq_time_ratio@64"] > 0 and "targets" in last


def test_memory_plan_from_the_saved_measurements_sets_the_recipe_micro_batch():
    """bench/memory_plan.py with the committed CPU measurements (no measuring here: meta-device model, DeepSpeed
    config): every line parses, and the qwen2.5-1.5b-ibq recipe's micro-batch is the largest that fits on both 1 and
    8 GPUs of 80 GB (issue 12)."""
    from ett_ds.config import load_config
    saved = REPO / "bench" / "memory_plan_qwen2.5-1.5b-ibq.json"
    rc, out, err = run_group([sys.executable, str(REPO / "bench" / "memory_plan.py"), "--measured", str(saved),
                              "--gpus", "1", "8", "--gpu-gb", "80", "141", "--json"], 180, cwd=REPO,
                             env=subprocess_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert rc == 0, err[-2000:]
    head, *plans = [json.loads(line) for line in out.strip().splitlines()]
    assert head["recipe"] == "qwen2.5-1.5b-ibq" and head["image_tokens"] == 1024
    assert 1.5e9 < head["params"]["parts"]["llm"] < 1.6e9 and head["params"]["parts"]["tokenizer"] > 9e7
    assert [(p["gpus"], p["gpu_gb"]) for p in plans] == [(1, 80.0), (1, 141.0), (8, 80.0), (8, 141.0)]
    for p in plans:
        states = p["model_states"]
        assert states["total_gb"] > 0 and states["deepspeed_estimator_gb"] > 0
        totals = [r["step_total_gb"] for r in p["micro_batches"]]
        assert totals == sorted(totals)
    fits_80 = min(p["largest_fitting_micro_batch"] for p in plans if p["gpu_gb"] == 80.0)
    assert load_config("qwen2.5-1.5b-ibq").train.micro_batch_size == head["recipe_micro_batch"] == fits_80


def test_memory_plan_measures_on_this_cpu():
    """The measuring path (tokenizer with its L_vq, the chunked quantizer, one LLM layer) at small sizes: every part
    gets a positive figure and the plan is a table of growing totals."""
    rc, out, err = run_group([sys.executable, str(REPO / "bench" / "memory_plan.py"), "--recipe", "tiny", "--gpus", "1",
                              "--gpu-gb", "80", "--measure-side", "32", "--measure-seq", "64",
                              "--measure-tokens", "64,256", "--json"], 180, cwd=REPO,
                             env=subprocess_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert rc == 0, err[-2000:]
    head, plan = [json.loads(line) for line in out.strip().splitlines()]
    measured = head["measured"]
    assert measured["quantizer"]["peak_gb"][0] > 0 and measured["tokenizer"]["at"][0]["saved_gb"] > 0
    assert measured["llm_layer"]["at"][1]["saved_gb"] > 0
    totals = [r["step_total_gb"] for r in plan["micro_batches"]]
    assert totals == sorted(totals) and totals[0] > 0

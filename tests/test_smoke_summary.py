"""The smoke test's verdicts (launchers/smoke_summary.py): each says PASS only at or past its threshold, names the
figure and its chance level, and flags captions that ignore the image."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launchers"))
import smoke_summary as S  # noqa: E402


def _samples(pairs):
    return [{"ref": r, "caption": c} for r, c in pairs]


def test_reads_passes_with_high_exact_match_and_diverse_captions():
    refs = [f"{i:03d}" for i in range(100, 120)] * 2
    hyps = refs[:30] + ["999"] * 10  # 75 % right
    v = S.read_verdict({"caption": {"exact_match": 0.75}}, _samples(zip(refs, hyps)))
    assert v["ok"] and "PASS" in v["line"] and v["chance"] == 2 / 40 and "ignore" not in v["line"]


def test_one_caption_for_every_image_fails_and_is_flagged():
    refs = [f"{i:03d}" for i in range(100, 140)]
    v = S.read_verdict({"caption": {"exact_match": 0.025}}, _samples((r, "100") for r in refs))
    assert not v["ok"] and "FAIL" in v["line"] and "captions ignore the image" in v["line"]
    assert v["diversity"] == 1 / 40


def test_high_exact_match_with_collapsed_captions_still_fails():
    refs = ["111"] * 60 + [f"{i}" for i in range(200, 240)]
    v = S.read_verdict({"caption": {"exact_match": 0.6}}, _samples((r, "111") for r in refs))
    assert not v["ok"]  # 60 % by always answering the most frequent caption: that is the chance level


def test_reconstructs_needs_both_checkpoints_under_the_threshold():
    ok = S.reconstruct_verdict({"recon": {"ocr_cer_recon": 0.12, "ocr_cer_original": 0.0, "psnr": 16.0}},
                               {"recon": {"ocr_cer_recon": 0.29, "psnr": 15.5}})
    bad = S.reconstruct_verdict({"recon": {"ocr_cer_recon": 0.12}}, {"recon": {"ocr_cer_recon": 0.31}})
    assert ok["ok"] and "PASS" in ok["line"] and not bad["ok"]
    assert not S.reconstruct_verdict({}, {})["ok"]


def test_draws_counts_exact_read_backs():
    items = [{"prompt": "123", "ocr": "123"}, {"prompt": "456", "ocr": "456"}, {"prompt": "789", "ocr": "780"},
             {"prompt": "321", "ocr": ""}, {"prompt": "654", "ocr": "6 5 4"}]
    v = S.draw_verdict({"t2i": {"samples": items, "ocr_cer": 0.3}})
    assert v["readback"] == 2 / 5 and v["ok"]
    v = S.draw_verdict({"t2i": {"samples": items[2:], "ocr_cer": 0.6}})
    assert v["readback"] == 0 and not v["ok"]


def test_the_script_prints_a_table_and_three_verdicts(tmp_path):
    run = tmp_path / "runs" / "ett"
    run.mkdir(parents=True)
    rows = [{"step": 1, "loss": 3.0, "loss_cap": 2.5, "samples_per_s": 10.0},
            {"step": 2, "eval": {"loss": 2.0}},  # evaluation rows are not training rows
            {"step": 3, "loss": 2.0, "loss_cap": 1.5, "samples_per_s": 12.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps({"caption": {"exact_match": 0.5}}))
    (tmp_path / "sft_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in _samples(
        [("101", "101"), ("202", "203")])))
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps({"vqa": {"accuracy": 0.25, "num_questions": 12}}))
    out = subprocess.run([sys.executable, str(REPO / "launchers" / "smoke_summary.py"), str(tmp_path / "runs"),
                          "--stages", "ett", "--eval-sft", str(sft), "--eval-vqa", str(vqa),
                          "--json", str(tmp_path / "v.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "| ett | 3 | 3.000 | 2.000 | loss_cap: 2.500 -> 1.500 |" in out
    assert "reads:        PASS" in out and "reconstructs: no OCR" in out and "draws:        no OCR" in out
    assert "VQA accuracy 25.0% on 12" in out
    assert set(json.loads((tmp_path / "v.json").read_text())) == {"reads", "reads_ett", "reconstructs", "draws",
                                                                  "generalises"}
    assert "generalises:  no per-family caption scores" in out


def test_generalises_needs_every_held_out_family_to_read_and_reconstruct():
    """issue 23 item 3: the worst held-out font family decides (goal: >= 70 % exact match, OCR CER <= 0.15 each)."""
    sft = {"caption": {"by_group": {"Liberation Sans": {"n": 50, "exact_match": 0.9, "cer": 0.02},
                                    "URW Gothic": {"n": 48, "exact_match": 0.72, "cer": 0.1}}}}
    ett = {"recon": {"by_group": {"Liberation Sans": {"n": 50, "ocr_cer_recon": 0.05},
                                  "URW Gothic": {"n": 48, "ocr_cer_recon": 0.14}}}}
    v = S.family_verdict(sft, ett)
    assert v["ok"] and "URW Gothic 72% (n=48)" in v["line"] and "URW Gothic 0.140" in v["line"]
    sft["caption"]["by_group"]["URW Gothic"]["exact_match"] = 0.69
    assert not S.family_verdict(sft, ett)["ok"]
    sft["caption"]["by_group"]["URW Gothic"]["exact_match"] = 0.8
    ett["recon"]["by_group"]["URW Gothic"]["ocr_cer_recon"] = 0.16
    assert not S.family_verdict(sft, ett)["ok"]

"""ett_ds.evaluate end to end on tiny checkpoints, its error paths, and the replication script's tiny mode."""
import io
import json
import tarfile
from pathlib import Path

import pytest

from ett_ds.evaluate import main as evaluate
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args

NUM_HELDOUT = 12


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 64, NUM_HELDOUT, 32)


def targs(demo, out, *extra):
    return demo_train_args(demo, out, "train.image_every=0", *extra)


@pytest.fixture(scope="module")
def ckpts(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert train(targs(demo, out, "name=tok", "stage=tokenizer", "train.max_steps=2")) == 0
    assert train(targs(demo, out, "name=e", "stage=ett", "train.max_steps=2")) == 0
    assert train(targs(demo, out, "name=g", "stage=t2i", "train.max_steps=1")) == 0
    return {k: out / k / "checkpoints" / f"step_{n:08d}" for k, n in (("tok", 2), ("e", 2), ("g", 1))}


def test_recon_and_caption_on_an_ett_checkpoint(demo, ckpts, tmp_path, capsys):
    out = tmp_path / "m.json"
    # t2i is asked for but this stage has no visual head: skipped with a note, not an error
    assert evaluate(["--ckpt", str(ckpts["e"]), "--data", f"{demo}/heldout", "--tasks", "recon,caption,t2i",
                     "--out", str(out), "--batch-size", "5", "--ocr", "off"]) == 0
    m = json.loads(out.read_text())
    assert m["num_samples"] == NUM_HELDOUT and m["stage"] == "ett"
    r, c = m["recon"], m["caption"]
    assert 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1
    assert 0 < r["codebook_usage"] <= 1 and 1 <= r["codebook_perplexity"] <= r["codebook_size"]
    assert 0 <= c["exact_match"] <= 1 and c["cer"] >= 0
    assert "visual head" in m["t2i"]["skipped"]
    lines = [json.loads(x) for x in (tmp_path / "m_samples.jsonl").read_text().splitlines()]
    assert len(lines) == NUM_HELDOUT
    assert all({"ref", "caption", "psnr", "ssim"} <= set(x) for x in lines)
    assert Path(r["grid"]).is_file()
    assert "caption.exact_match" in capsys.readouterr().out


def test_recon_only_on_a_tokenizer_checkpoint_with_ocr(demo, ckpts, tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    out = tmp_path / "tok.json"
    assert evaluate(["--ckpt", str(ckpts["tok"].parent.parent), "--data", f"{demo}/heldout", "--tasks", "recon",
                     "--out", str(out), "--max-samples", "4", "--batch-size", "4", "--ocr", "on", "--quiet"]) == 0
    r = json.loads(out.read_text())["recon"]
    assert r["ocr_cer_recon"] >= 0 and r["ocr_cer_original"] >= 0 and 0 <= r["ocr_em_original"] <= 1
    assert len((tmp_path / "tok_samples.jsonl").read_text().splitlines()) == 4


def test_t2i_generates_a_grid(demo, ckpts, tmp_path):
    out = tmp_path / "g.json"
    assert evaluate(["--ckpt", str(ckpts["g"]), "--data", f"{demo}/heldout", "--tasks", "t2i", "--out", str(out),
                     "--t2i-samples", "3", "--ocr", "off", "--quiet"]) == 0
    t = json.loads(out.read_text())["t2i"]
    assert t["num"] == 3 and Path(t["grid"]).is_file() and len(t["samples"]) == 3


@pytest.mark.parametrize("case", ["no_ckpt", "no_data", "caption_on_tokenizer", "bad_task"])
def test_errors_are_one_line_exit_2(demo, ckpts, tmp_path, capsys, case):
    argv = {"no_ckpt": ["--ckpt", str(tmp_path / "nope"), "--data", f"{demo}/heldout"],
            "no_data": ["--ckpt", str(ckpts["e"]), "--data", str(tmp_path / "missing")],
            "caption_on_tokenizer": ["--ckpt", str(ckpts["tok"]), "--data", f"{demo}/heldout", "--tasks", "caption"],
            "bad_task": ["--ckpt", str(ckpts["e"]), "--data", f"{demo}/heldout", "--tasks", "recon,vqa"]}[case]
    capsys.readouterr()
    assert evaluate([*argv, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "x.json").exists()


def test_an_eval_set_past_the_error_rate_stops_with_one_line(demo, ckpts, tmp_path, capsys):
    """Broken samples are counted, reported in the result, and past data.max_error_rate they end the evaluation."""
    good = sorted((demo / "heldout").glob("*.tar"))[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(good) as src, tarfile.open(bad / "mixed-000000.tar", "w") as dst:
        for info in src:
            dst.addfile(info, src.extractfile(info))
        for i in range(NUM_HELDOUT):  # as many corrupt JPEGs as good samples: error rate 0.5 > 0.1
            for ext, data in (("jpg", b"not a jpeg at all"), ("txt", b"caption")):
                info = tarfile.TarInfo(f"broken{i:03d}.{ext}")
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    capsys.readouterr()
    assert evaluate(["--ckpt", str(ckpts["e"]), "--data", str(bad), "--tasks", "recon", "--ocr", "off",
                     "--out", str(tmp_path / "x.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data error rate" in err[0] and "'unreadable': 12" in err[0], err
    out = tmp_path / "ok.json"  # the clean set reports its counts: every sample delivered, nothing skipped
    assert evaluate(["--ckpt", str(ckpts["e"]), "--data", f"{demo}/heldout", "--tasks", "recon", "--ocr", "off",
                     "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["data_stats"] == {"ok": NUM_HELDOUT}


def test_replicate_tiny_runs_every_arm_and_writes_the_report(tmp_path):
    from ett_ds.replicate import main as replicate
    out = tmp_path / "rep"
    assert replicate(["--size", "tiny", "--out", str(out), "--steps0", "2", "--steps1", "1", "--steps2", "1"]) == 0
    for f in ("results.md", "results.json", "bars.png", "recon_by_arm.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    arms = [r["arm"] for r in res["rows"]]
    assert arms[1:] == ["index", "frozen", "ett_a0.25", "ett_a0.5", "ett_a1.0", "und_only"]
    frozen = [r for r in res["rows"] if not r["tokenizer_tuned"]]
    assert len({round(r["psnr"], 4) for r in frozen}) == 1  # frozen tokenizers reconstruct exactly like stage 0
    md = (out / "results.md").read_text()
    assert "| arm |" in md and "ett_a0.25" in md and "Goal checks" in md and "best ETT arm by caption EM" in md
    assert res["goal"]["best_ett_arm"] in arms
    # a rerun into the same folder reuses every finished stage; with other settings it refuses instead of mixing
    assert replicate(["--size", "tiny", "--out", str(out), "--steps0", "2", "--steps1", "1", "--steps2", "1"]) == 0
    with pytest.raises(SystemExit, match="trained with other settings.*optim.lr=0.002"):
        replicate(["--size", "tiny", "--out", str(out), "--steps0", "2", "--steps1", "1", "--steps2", "1",
                   "--lr", "2e-3"])

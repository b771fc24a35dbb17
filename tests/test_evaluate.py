"""ett_ds.evaluate end to end on tiny checkpoints, its error paths, and the replication script's tiny mode."""
import io
import json
import tarfile
from pathlib import Path

import pytest

from ett_ds.evaluate import main as evaluate
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

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
    assert all({"ref", "caption", "psnr", "ssim", "group"} <= set(x) for x in lines)
    # the demo's samples name their font family: every score is also given per family (issue 23, item 3)
    fams = {x["group"] for x in lines}
    assert set(c["by_group"]) == set(r["by_group"]) == fams
    assert sum(v["n"] for v in c["by_group"].values()) == NUM_HELDOUT
    assert c["exact_match"] == pytest.approx(sum(v["n"] * v["exact_match"] for v in c["by_group"].values())
                                             / NUM_HELDOUT)
    assert Path(r["grid"]).is_file()
    assert m["resize_mode"] == "crop" and m["image_size"] == [16, 32]
    distinct = len({x["caption"].strip().casefold() for x in lines})
    assert c["distinct_predictions"] == distinct and c["diversity"] == distinct / c["distinct_references"]
    captured = capsys.readouterr()
    assert "caption.exact_match" in captured.out and "caption.diversity" in captured.out
    # the demo images have the training aspect ratio: no aspect warning; a diversity warning exactly when < 0.2
    assert "aspect" not in captured.err
    assert ("captions ignore the image?" in captured.err) == (c["diversity"] < 0.2) == bool(m["warnings"])


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


# --- caption diversity and the metrics' documentation ------------------------------------------------------------
def test_caption_diversity_is_distinct_predictions_over_distinct_references():
    from ett_ds.evaluate import caption_diversity, result_warnings
    refs = [f"word {i}" for i in range(10)] * 2  # 10 distinct references
    same = caption_diversity(["the same  Caption"] * 19 + ["The same caption"], refs)  # case/space-insensitive
    assert same == {"diversity": 0.1, "distinct_predictions": 1, "distinct_references": 10}
    w = result_warnings({"caption": same})
    assert len(w) == 1 and "0.100 < 0.2" in w[0] and "captions ignore the image?" in w[0]
    varied = caption_diversity([f"guess {i % 4}" for i in range(20)], refs)
    assert varied["diversity"] == 0.4 and result_warnings({"caption": varied}) == []
    assert result_warnings({"caption": caption_diversity(["a", "b"], ["a", "b", "c", "d", "e", "f", "g", "h",
                                                                       "i", "j", "k"])}) != []  # 2/11 < 0.2
    assert caption_diversity([], [])["diversity"] is None and result_warnings({"recon": {}}) == []


def test_help_explains_the_caption_metrics(capsys):
    from ett_ds.evaluate import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``cer``: corpus character error rate = total edit distance" in text
    assert "``mean_cer``: the mean over samples" in text
    assert "exceed 1 when the model babbles" in text and "distinct predictions / distinct references" in text
    page = " ".join((Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text().split())
    assert "exceed 1 when the model babbles" in page and "data.resize_mode" in page


def test_square_images_on_a_strip_checkpoint_warn_once_and_pad_keeps_them_whole(demo, ckpts, tmp_path, capsys):
    """Images of another aspect ratio than the training size: one warning line; --resize-mode picks the fit."""
    from PIL import Image

    from ett_ds.data.transforms import reset_aspect_warning
    shards = tmp_path / "square"
    shards.mkdir()
    with tarfile.open(shards / "sq-000000.tar", "w") as dst:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), (40 * i, 255 - 40 * i, 90)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"square {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    reset_aspect_warning()
    capsys.readouterr()
    out = tmp_path / "sq.json"
    assert evaluate(["--ckpt", str(ckpts["tok"]), "--data", str(shards), "--tasks", "recon", "--ocr", "off",
                     "--out", str(out), "--quiet", "--resize-mode", "pad", "--batch-size", "4"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(err) == 1 and "48x48" in err[0] and "32x16" in err[0] and "pad" in err[0], err
    m = json.loads(out.read_text())
    assert m["resize_mode"] == "pad" and m["num_samples"] == 6 and m["warnings"] == []

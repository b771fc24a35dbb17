"""``python -m data_tools``: shard / verify / resume / synth-text / train-spm / demo / import, end to end on disk."""
from __future__ import annotations

import glob
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools.cli import main
from data_tools.tario import ShardTarWriter
from ett_ds.data.eval_stream import eval_batches
from ett_ds.data.transforms import image_to_tensor

REPO = Path(__file__).resolve().parents[1]
FONT_GLOBS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans*.ttf",
              str(Path(sys.prefix) / "lib/python3*/site-packages/matplotlib/mpl-data/fonts/ttf/DejaVuSans*.ttf")]


def _fonts() -> list[str]:
    for pattern in FONT_GLOBS:
        if glob.glob(pattern):
            return [pattern]
    pytest.skip("no DejaVu fonts (apt-get install -y fonts-dejavu-core)")


def make_example(sample):
    return {"image": image_to_tensor(sample["image"], (8, 8)), "text": sample["text"], "json": sample["json"]}


def collate(examples):
    return {"image": torch.stack([e["image"] for e in examples]), "text": [e["text"] for e in examples],
            "json": [e["json"] for e in examples]}


def _img(path: Path, i: int, size=(24, 18), fmt=None) -> Path:
    Image.new("RGB", size, (i * 7 % 256, i * 13 % 256, 90)).save(path, format=fmt)
    return path


def make_folder(root: Path, n_good: int = 20) -> set[str]:
    """n_good good samples (jpg/png/webp, txt or json sidecars) plus one of each failure; returns good captions."""
    root.mkdir(parents=True)
    captions = set()
    for i in range(n_good):
        ext = ("jpg", "png", "webp")[i % 3]
        sub = root / ("sub" if i % 4 == 0 else "")
        sub.mkdir(exist_ok=True)
        _img(sub / f"img{i:03d}.{ext}", i)
        cap = f"a picture number {i}"
        if i % 5 == 0:
            (sub / f"img{i:03d}.json").write_text(json.dumps({"caption": cap, "license": "cc0"}))
        else:
            (sub / f"img{i:03d}.txt").write_text(cap + "\n")
        captions.add(cap)
    (root / "bad_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="JPEG")
    (root / "bad_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    for name in ("bad_corrupt", "bad_truncated", "bad_empty", "bad_utf8", "bad_small"):
        (root / f"{name}.txt").write_text("caption")
    _img(root / "bad_empty.png", 1)
    (root / "bad_empty.txt").write_text("  \n")
    _img(root / "bad_utf8.png", 2)
    (root / "bad_utf8.txt").write_bytes(b"caf\xe9 latin-1")
    _img(root / "bad_small.png", 3, size=(4, 4))
    _img(root / "bad_nocaption.png", 4)
    return captions


def _tar_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_shard_folder_verify_load(tmp_path, capsys):
    captions = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["shard", str(tmp_path / "in"), "--out", str(out), "--samples-per-shard", "8", "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["ok"] == 20
    assert stats["failed"] == {"empty_caption": 1, "missing_caption": 1, "non_utf8_caption": 1, "too_small": 1,
                               "truncated": 1, "unreadable": 1}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == [f"data-{i:06d}.tar" for i in range(4)] and sum(sizes.values()) == 20
    assert main(["verify", str(out)]) == 0
    names = [m for t in sorted(out.glob("*.tar")) for m in tarfile.open(t).getnames()]
    keys = [n.split(".")[0] for n in names]
    assert len(set(keys)) == 20 and all(len(k) == 12 and k.isdigit() for k in keys)
    got, metas = set(), []
    for b in eval_batches(str(out), batch_size=5, make_example=make_example, collate=collate, rank=0, world_size=1):
        got.update(b["text"])
        metas.extend(b["json"])
    assert got == captions
    assert {m.get("license") for m in metas} == {"cc0", None} and all("source" in m for m in metas)


def test_shard_manifests_resize_and_formats(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(6):
        _img(src / f"{i}.png", i, size=(64, 32))
        rows.append({"path": f"imgs/{i}.png", "text": f"row {i}", "label": i})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert main(["shard", str(tmp_path / "m.jsonl"), "--out", str(out), "--image-col", "path", "--caption-col",
                 "text", "--max-side", "16", "--format", "jpg", "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    with tarfile.open(out / "data-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    first = "000000000000"
    assert Image.open(io.BytesIO(members[f"{first}.jpg"])).size == (16, 8)
    meta = json.loads(members[f"{first}.json"])
    assert meta["label"] == 0 and meta["caption"] == "row 0" and members[f"{first}.txt"] == b"row 0"
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,caption\n" + "".join(f"imgs/{i}.png,csv row {i}\n" for i in range(6)))
    out2 = tmp_path / "out2"
    assert main(["shard", str(csv_path), "--out", str(out2), "--bytes-per-shard", "300", "--no-progress"]) == 0
    assert len(list(out2.glob("*.tar"))) > 1 and main(["verify", str(out2)]) == 0


def test_resume_is_byte_identical(tmp_path):
    make_folder(tmp_path / "in")
    args = ["shard", str(tmp_path / "in"), "--samples-per-shard", "6", "--no-progress"]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref)]) == 0
    expected = _tar_bytes(ref)
    # interrupted run: one shard never finished (tar present, no stats), one lost, a stale temp file left over
    (ref / "data-000001_stats.json").unlink()
    (ref / "data-000001.tar").write_bytes(b"half written")
    (ref / "data-000002_stats.json").unlink()
    (ref / "data-000002.tar").unlink()
    (ref / ".data-000003.tar.tmp-999").write_bytes(b"junk")
    sizes_before = (ref / "sizes.json").read_text()
    assert main(args + ["--out", str(ref)]) == 2  # refuses to mix runs without --resume
    assert main(args + ["--out", str(ref), "--resume"]) == 0
    assert _tar_bytes(ref) == expected and (ref / "sizes.json").read_text() == sizes_before
    assert not list(ref.glob(".*tmp*"))
    assert main(args + ["--out", str(ref), "--resume", "--samples-per-shard", "5"]) == 2  # different plan
    par = tmp_path / "par"  # the worker pool writes the very same bytes
    assert main(args + ["--out", str(par), "--workers", "2"]) == 0
    assert _tar_bytes(par) == expected


def test_verify_reports_problems(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (9, 9)).save(png, format="PNG")
    with tarfile.open(d / "x-000000.tar", "w") as tar:
        for name, data in [("k1.png", png.getvalue()), ("k2.png", png.getvalue()), ("k1.txt", b"late"),
                           ("k3.png", b"broken"), ("k3.txt", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with ShardTarWriter(d / "x-000001.tar") as w:
        w.write("k2", {"png": png.getvalue(), "txt": b"dup key"})
    (d / "sizes.json").write_text(json.dumps({"x-000000.tar": 3, "x-000001.tar": 5}))
    from data_tools.verify import verify_dir
    problems = "\n".join(verify_dir(d)["problems"])
    for needle in ("not adjacent", "already used", "does not decode", "empty caption", "sizes.json says 5"):
        assert needle in problems
    assert main(["verify", str(d)]) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [["shard", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
             ["shard", str(tmp_path), "--out", str(tmp_path / "o"), "--samples-per-shard", "0"],
             ["synth-text", "--fonts", "/no/such/*.ttf", "--corpus", "x", "--num", "3", "--out", str(tmp_path)],
             ["synth-text", "--fonts", "a", "--corpus", "x", "--num", "3", "--out", str(tmp_path), "--size", "3by4"],
             ["import", "fashion-mnist", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
             ["frobnicate"], ["verify", str(tmp_path / "missing")]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err, (argv, err)
    assert "apt-get install -y dataset-fashion-mnist" in (main(cases[4]), capsys.readouterr().err)[1]
    proc = subprocess.run([sys.executable, "-m", "data_tools", "shard", str(tmp_path / "nope"), "--out", "x"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "input not found" in proc.stderr


def _corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(f"line {w} number {i}" for i, w in enumerate(
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split())))
    return p


def test_synth_text_deterministic_and_splits(tmp_path):
    fonts, corpus = _fonts(), _corpus(tmp_path)
    base = ["synth-text", "--fonts", *fonts, "--corpus", str(corpus), "--num", "30", "--size", "24x96",
            "--samples-per-shard", "16", "--no-progress", "--max-chars", "14"]
    assert main(base + ["--seed", "5", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--seed", "5", "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    assert main(base + ["--seed", "6", "--out", str(tmp_path / "c")]) == 0
    a = _tar_bytes(tmp_path / "a")
    assert len(a) == 2 and a == _tar_bytes(tmp_path / "b") and a != _tar_bytes(tmp_path / "c")
    assert main(["verify", str(tmp_path / "a")]) == 0
    with tarfile.open(tmp_path / "a" / "synth-000000.tar") as tar:
        m = {x.name: tar.extractfile(x).read() for x in tar.getmembers()}
    for key in {n.split(".")[0] for n in m}:
        meta = json.loads(m[f"{key}.json"])
        assert m[f"{key}.txt"].decode() == meta["text"] and len(meta["text"]) <= 14 and meta["seed"] == 5
        assert Image.open(io.BytesIO(m[f"{key}.png"])).size == (96, 24)
    texts = {}
    for split in ("train", "heldout"):
        out = tmp_path / split
        assert main(base + ["--out", str(out), "--text-split", split, "--words", "1-2", "--heldout-percent",
                            "30"]) == 0
        texts[split] = {b for t in out.glob("*.tar") for b in _captions(t)}
    assert texts["train"] and texts["heldout"] and not texts["train"] & texts["heldout"]


def _captions(tar_path: Path) -> set[str]:
    with tarfile.open(tar_path) as tar:
        return {tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}


def test_train_spm_and_demo(tmp_path, capsys):
    _fonts()
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--num-train", "300", "--num-heldout", "40", "--samples-per-shard", "100",
            "--no-progress"]
    assert main(argv) == 0
    assert "built in" in capsys.readouterr().out
    assert len(list((out / "train").glob("demo-*.tar"))) == 3 and list((out / "heldout").glob("demo-*.tar"))
    assert (out / "README.txt").exists() and main(["verify", str(out / "train")]) == 0
    train_caps = {c for t in (out / "train").glob("*.tar") for c in _captions(t)}
    held_caps = {c for t in (out / "heldout").glob("*.tar") for c in _captions(t)}
    assert not train_caps & held_caps  # held out by string
    assert all(c.isdigit() and len(c) == 3 for c in train_caps | held_caps)  # the default task: numbers
    manifest = json.loads((out / "demo_manifest.json").read_text())["config"]
    assert not set(manifest["train_fonts"]) & set(manifest["heldout_fonts"])  # and by font
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [p.strip("\u2581") for p in sp.encode("907", out_type=str) if p != "\u2581"] == ["9", "0", "7"]
    assert sp.decode(sp.encode("zebra crossing Ω")) == "zebra crossing Ω"  # byte fallback
    assert main(argv) == 0 and "skipped" in capsys.readouterr().out
    spm_args = ["train-spm", "--input", str(out / "train"), "--out", str(tmp_path / "sp"), "--vocab-size"]
    assert main(spm_args + ["100"]) == 2 and "below the minimum" in capsys.readouterr().err
    assert main(spm_args + ["5000"]) == 0  # far more than 300 captions support: shrinks instead of failing
    assert 260 < json.loads(capsys.readouterr().out.strip())["vocab_size"] < 5000


def test_demo_words_task_keeps_the_old_colour_set(tmp_path):
    _fonts()
    out = tmp_path / "words"
    assert main(["demo", "--out", str(out), "--task", "words", "--num-train", "60", "--num-heldout", "10",
                 "--samples-per-shard", "60", "--no-progress"]) == 0
    opts = json.loads((out / "demo_manifest.json").read_text())["config"]["options"]
    assert (opts["task"], opts["width"], opts["palette"]) == ("words", 128, "any")
    caps = {c for t in (out / "train").glob("*.tar") for c in _captions(t)}
    assert any(not c.isdigit() for c in caps) and max(map(len, caps)) <= 16


def test_ink_palette_is_dark_on_light_and_any_keeps_contrast():
    import random

    from data_tools.synth_text import _luma, pick_colours
    rng = random.Random(0)
    for _ in range(200):
        bg, fg = pick_colours(rng, "ink")
        assert min(bg) >= 188 and max(fg) <= 82
        bg, fg = pick_colours(rng, "any")
        assert abs(_luma(bg) - _luma(fg)) >= 90
    with pytest.raises(Exception, match="unknown palette"):
        pick_colours(rng, "neon")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_import_fashion_mnist(tmp_path):
    out = tmp_path / "fm"
    assert main(["import", "fashion-mnist", "--split", "test", "--limit", "30", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "stats.json").read_text())["ok"] == 30 and main(["verify", str(out)]) == 0
    caps = _captions(out / "fashion_mnist-000000.tar")
    assert caps and all(c.startswith("a photo of a ") for c in caps)


@pytest.mark.skipif(not Path("/usr/share/tuxpaint/stamps").exists(),
                    reason="apt-get install -y tuxpaint-stamps-default")
def test_import_tuxpaint(tmp_path):
    out = tmp_path / "tux"
    assert main(["import", "tuxpaint", "--only-category", "food", "--limit", "12", "--out", str(out),
                 "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    with tarfile.open(out / "tuxpaint-000000.tar") as tar:
        pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(pngs) == 12 and all(m["category"] == "food" for m in metas)
    assert all(Image.open(io.BytesIO(p)).mode in ("RGB", "L") and max(Image.open(io.BytesIO(p)).size) <= 256
               for p in pngs)


def test_shard_parquet_manifest_keeps_extra_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(5):
        _img(src / f"{i}.png", i, size=(40, 20))
    table = pa.table({"file": [f"imgs/{i}.png" for i in range(5)], "caption": [f"pq row {i}" for i in range(5)],
                      "score": [0.5 * i for i in range(5)]})
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "out"
    assert main(["shard", str(tmp_path / "m.parquet"), "--out", str(out), "--image-col", "file",
                 "--samples-per-shard", "2", "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"data-000000.tar": 2, "data-000001.tar": 2,
                                                             "data-000002.tar": 1}
    with tarfile.open(out / "data-000002.tar") as tar:
        meta = json.loads(tar.extractfile("000002000000.json").read())
    assert meta["caption"] == "pq row 4" and meta["score"] == 2.0

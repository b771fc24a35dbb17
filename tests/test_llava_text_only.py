"""Issue 22 item 4: LLaVA's text-only rows (about 40k of llava_v1_5_mix665k) are written and trained.

``data_tools llava`` writes a text-only row as a sample with its json alone and counts it (``text_only`` among
``ok`` in stats.json). The sft Batcher gives such a sample a blank image whose block sits after the text, outside the
attention mask and the labels, so every sample (and every rank, under ZeRO-3) runs the same modules and the text
trains as plain language modelling. Still unsupported, and counted: several images per row (``multiple_images``) and
an ``<image>`` mark without an image (``no_image``).
"""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools.cli import main as data_tools
from tests.tiny import SHRINK, run_group, subprocess_env, text_png, tiny_config, train_spm, turn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """6 rows with an image, 6 text-only rows, one <image> mark without an image, one image list."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    rows = []
    for i in range(6):
        (root / "images" / f"{i}.png").write_bytes(text_png(str(100 + i)))
        rows.append({"id": f"img-{i}", "image": f"{i}.png",
                     "conversations": [turn("human", "<image>\nwhat number"), turn("gpt", str(100 + i))]})
        rows.append({"id": f"text-{i}", "conversations": [turn("human", "name a colour"), turn("gpt", "red cat"),
                                                          turn("human", "and another"), turn("gpt", "blue sun")]})
    rows += [{"id": "mark-no-image", "conversations": [turn("human", "<image>\nwhat"), turn("gpt", "1")]},
             {"id": "two-images", "image": ["0.png", "1.png"],
              "conversations": [turn("human", "<image>\nwhat"), turn("gpt", "1")]}]
    (root / "rows.json").write_text(json.dumps(rows))
    out = root / "shards"
    assert data_tools(["llava", str(root / "rows.json"), "--image-root", str(root / "images"), "--out", str(out),
                       "--samples-per-shard", "4", "--no-progress"]) == 0
    return out


def test_text_only_rows_are_written_and_counted_the_unsupported_rest_counted_by_reason(llava, capsys):
    stats = json.loads((llava / "stats.json").read_text())
    assert stats["ok"] == 12 and stats["text_only"] == 6
    assert stats["failed"] == {"multiple_images": 1, "no_image": 1}
    from ett_ds.data.decode import decode_sample, iter_tar_samples
    samples = [s for shard in sorted(llava.glob("*.tar")) for s in iter_tar_samples(str(shard), Counter())]
    text_only = [s for s in samples if "png" not in s]
    assert len(text_only) == 6 and all(set(s) == {"__key__", "__url__", "json"} for s in text_only)
    sample = decode_sample(text_only[0])
    assert sample["image"] is None and sample["json"]["task"] == "sft"
    assert data_tools(["verify", str(llava)]) == 0
    assert "12 samples, 0 problems" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from ett_ds.trainer import Trainer
    spm = train_spm(tmp_path_factory.mktemp("spm"))
    return Trainer(tiny_config(spm, tmp_path_factory.mktemp("run"), "stage=sft", "engine.precision=fp32"))


def _example(trainer, conversations, image: bool):
    from ett_ds.data.batch import Batcher
    b = Batcher(trainer.cfg, trainer.text, train=False)
    meta = {"task": "sft", "conversations": conversations}
    img = Image.new("RGB", (64, 32), (10, 200, 30)) if image else None
    return b, b.make_example({"__key__": "k", "image": img, "text": None, "json": meta})


@pytest.mark.slow  # the engine's setup
def test_a_text_only_sample_trains_as_plain_text_its_blank_image_unseen(trainer):
    from ett_ds.data.text import IGNORE
    conv = [turn("human", "name a colour"), turn("gpt", "red cat")]
    b, ex = _example(trainer, conv, image=False)
    text_ids, text_labels = b.chat_sequence(conv, image=False)
    n = len(text_ids)
    assert ex["input_ids"] == text_ids + b.image_ids()
    assert ex["labels"] == text_labels + [IGNORE] * len(b.image_ids())
    assert ex["attend"] == n and ex["text_only"] and int(ex["pixels"].float().sub(128).abs().max()) == 0
    _, with_image = _example(trainer, [turn("human", "<image>\nwhat"), turn("gpt", "red")], image=True)
    batch = b.collate([ex, with_image])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    # the loss of the text-only sample does not depend on its placeholder image: nothing attends to it
    losses = []
    for fill in (0.0, 0.7):
        one = b.collate([ex])
        pixels = torch.full_like(one["pixels"], 0, dtype=torch.float32) + fill
        with torch.no_grad():
            out = trainer.engine(pixels=pixels, input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                                 labels=one["labels"])
        losses.append(float(out["loss_cap"]))
        assert int(out["num_caption_tokens"]) == sum(t != IGNORE for t in text_labels)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_text_only_samples_are_skipped_where_the_image_would_train_the_tokenizer(tmp_path):
    from ett_ds.config import load_config
    from ett_ds.data.batch import Batcher
    from ett_ds.data.format import SampleError
    from ett_ds.data.text import TextTokenizer
    spm = train_spm(tmp_path)
    cfg = load_config("tiny", ["stage=ett", "data.demo_dir=null", f"model.llm.text_tokenizer={spm}"])
    b = Batcher(cfg, TextTokenizer(spm), train=False)
    with pytest.raises(SampleError, match="missing_image"):
        b.make_example({"__key__": "k", "image": None, "text": None,
                        "json": {"conversations": [turn("human", "hi"), turn("gpt", "red")]}})


@pytest.mark.slow
def test_two_ranks_zero3_sft_trains_on_a_mix_of_text_only_and_image_samples(llava, tmp_path):
    spm = train_spm(tmp_path / "spm")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ett_ds.train", "--config", "tiny", f"out_dir={tmp_path}", "name=mix", "stage=sft",
           f"data.train={llava}", f"data.eval={llava}", f"model.llm.text_tokenizer={spm}", *SHRINK,
           "data.num_workers=0", "data.shuffle_buffer=4", "train.max_steps=4", "train.image_every=0",
           "train.log_every=1", "train.save_every=1000"]
    rc, out, err = run_group(cmd, 400, cwd=REPO, env=subprocess_env())
    assert rc == 0, (out + err)[-3000:]
    rows = [json.loads(x) for f in (tmp_path / "mix").rglob("metrics.jsonl") for x in f.read_text().splitlines()
            if x.startswith("{")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    data = Counter()
    for r in steps:
        data.update(r.get("data") or {})
    print("2-rank sft on the mix:", [round(r["loss"], 3) for r in steps], dict(data))
    assert data["text_only"] > 0 and data["ok"] > data["text_only"], data  # both kinds trained
    assert set(data) == {"ok", "text_only"}, data  # nothing skipped

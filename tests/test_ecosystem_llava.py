"""Issue #14 item 2: ``data_tools llava`` turns LLaVA-format conversations into SFT shards the sft stage trains on.

The fixture is a LLaVA instruction file as LLaVA ships it (a JSON list of {id, image, conversations}) with its images
under an image root, plus the rows such a file really contains that the stage cannot use: a text-only row, a
missing image file, a corrupt image, a duplicate id, an unknown role, two <image> marks, an image list.
"""
import json
import tarfile

import pytest

from data_tools.cli import main as data_tools
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args, text_png, turn

SINGLE = [turn("human", "<image>\nWhat number is shown?"), turn("gpt", "{n}")]
MULTI = [turn("human", "Look at this picture.\n<image>"), turn("gpt", "I see a number."),
         turn("human", "What is the first digit?"), turn("gpt", "{d}"),
         turn("human", "And the whole number?"), turn("gpt", "{n}")]


def fill(conv, n):
    return [turn(t["from"], t["value"].format(n=n, d=str(n)[0])) for t in conv]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    (root / "images" / "coco").mkdir(parents=True)
    rows = []
    for i in range(8):
        n = 100 + 37 * i
        (root / "images" / "coco" / f"{i:04d}.png").write_bytes(text_png(str(n)))
        rows.append({"id": f"good-{i}", "image": f"coco/{i:04d}.png", "conversations": fill(SINGLE if i % 2 else MULTI, n)})
    (root / "images" / "coco" / "broken.png").write_bytes(text_png("1")[:40])
    rows += [
        {"id": "text-only", "conversations": fill(SINGLE, 5)},
        {"id": "gone", "image": "coco/missing.png", "conversations": fill(SINGLE, 6)},
        {"id": "broken", "image": "coco/broken.png", "conversations": fill(SINGLE, 7)},
        {"id": "good-0", "image": "coco/0001.png", "conversations": fill(SINGLE, 8)},
        {"id": "robot", "image": "coco/0001.png", "conversations": [turn("robot", "<image>\nhi"), turn("gpt", "9")]},
        {"id": "two-marks", "image": "coco/0001.png",
         "conversations": [turn("human", "<image>\n<image>\nboth?"), turn("gpt", "9")]},
        {"id": "no-answer", "image": "coco/0001.png", "conversations": [turn("human", "<image>\nhi")]},
        {"id": "two-images", "image": ["coco/0001.png", "coco/0002.png"], "conversations": fill(SINGLE, 9)},
        {"image": "coco/0001.png", "conversations": fill(SINGLE, 9)},
    ]
    (root / "llava_instruct.json").write_text(json.dumps(rows))
    out = root / "shards"
    assert data_tools(["llava", str(root / "llava_instruct.json"), "--image-root", str(root / "images"),
                       "--out", str(out), "--samples-per-shard", "6", "--no-progress"]) == 0
    return out


def samples(folder):
    """{id: (image ext, json)} of every sample in the folder's shards."""
    found = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, mem in members.items():
            meta = json.loads(mem["json"])
            found[meta["id"]] = ([e for e in mem if e != "json"], meta)
    return found


def test_llava_rows_become_sft_samples_and_bad_rows_are_counted_by_reason(llava):
    stats = json.loads((llava / "stats.json").read_text())
    assert stats["ok"] == 8
    assert stats["failed"] == {"bad_conversations": 3, "bad_id": 1, "duplicate_id": 1, "missing_image": 1,
                               "multiple_images": 1, "no_image": 1, "unreadable": 1}
    got = samples(llava)
    assert sorted(got) == [f"good-{i}" for i in range(8)]
    exts, meta = got["good-0"]
    assert exts == ["png"] and meta["task"] == "sft" and meta["image"] == "coco/0000.png"
    assert meta["conversations"] == fill(MULTI, 100)  # every turn, <image> where the row put it (end of turn 1)
    assert got["good-1"][1]["conversations"] == fill(SINGLE, 137)


def test_llava_shards_verify(llava, capsys):
    assert data_tools(["verify", str(llava)]) == 0
    assert "8 samples, 0 problems" in capsys.readouterr().out


def test_the_sft_batcher_puts_the_image_where_the_row_placed_it(llava, tmp_path_factory):
    from ett_ds.config import load_config
    from ett_ds.data.batch import Batcher
    from ett_ds.data.text import IGNORE, TextTokenizer
    demo = build_demo(tmp_path_factory.mktemp("demo_b"), 16, 4, 16)
    cfg = load_config("tiny", ["stage=sft", "data.demo_dir=null", f"model.llm.text_tokenizer={demo}/spm.model"])
    text = TextTokenizer(cfg.model.llm.text_tokenizer)
    b = Batcher(cfg, text, train=False)
    conv = samples(llava)["good-0"][1]["conversations"]
    ids, labels = b.chat_sequence(conv)
    first_image = ids.index(text.boi_id)
    before = text.decode([i for i in ids[:first_image] if i not in (text.bos_id,)])
    assert "Look at this picture." in before  # the mark closed the first turn, so the question comes first
    supervised = text.decode([t for t in labels if t != IGNORE and t != text.eos_id])
    assert all(x in supervised for x in ("I see a number.", "1", "100"))  # all three assistant turns


def test_sft_stage_trains_two_steps_on_llava_shards(llava, tmp_path_factory):
    demo = build_demo(tmp_path_factory.mktemp("demo"), 16, 4, 16)  # for its spm.model only
    out = tmp_path_factory.mktemp("runs")
    assert train(demo_train_args(demo, out, "name=l", "stage=sft", "train.max_steps=2", "train.image_every=0",
                                 f"data.train={llava}", f"data.eval={llava}")) == 0
    assert (out / "l" / "checkpoints" / "step_00000002").is_dir()
    rows = [json.loads(x) for f in (out / "l").rglob("metrics.jsonl") for x in f.read_text().splitlines()
            if x.startswith("{")]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)
    assert set(steps[-1]["data"]) == {"ok"}  # the stage took every sample: no skip reason at all

"""Reading that generalises (issue 23, item 3): the demo trains on every text font the machine has but whole held-out
collections (Liberation, URW Gothic), with augmented training images; evaluation reports each held-out family."""
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_tools import fonts as F
from data_tools.cli import main
from data_tools.synth_text import SynthConfig, render_sample


def test_collections_group_a_foundrys_families():
    names = {"/x/DejaVuSansMono-Bold.ttf": "DejaVu", "DejaVuSerif.ttf": "DejaVu", "LiberationSans-Regular.ttf":
             "Liberation", "LiberationMono-Italic.ttf": "Liberation", "URWGothic-Book.otf": "URWGothic",
             "FreeMonoBold.ttf": "Free", "NimbusSansNarrow-Bold.otf": "Nimbus", "C059-Roman.otf": "C059"}
    assert {f: F.collection(f) for f in names} == names


def test_the_split_keeps_whole_collections_apart():
    fonts = F.text_fonts()
    if len({F.collection(f) for f in fonts}) < 2:
        pytest.skip("needs two font collections (apt-get install fonts-dejavu-core fonts-liberation2)")
    train, held = F.demo_split(fonts)
    assert train and held and not {F.collection(f) for f in train} & {F.collection(f) for f in held}
    assert {F.collection(f) for f in held} <= set(F.HELDOUT_COLLECTIONS)
    # only text fonts: every digit and letter distinct and inked (symbol, dingbat and CJK fallback fonts are out)
    assert all(F.is_text_font(f) for f in fonts)
    assert not any(F.NOT_TEXT.search(F.family(f)) for f in fonts)


def test_without_a_second_collection_one_family_is_held_out(tmp_path):
    dejavu = [f for f in F.text_fonts() if F.collection(f) == "DejaVu"]
    if len({F.family(f) for f in dejavu}) < 2:
        pytest.skip("needs two DejaVu families")
    train, held = F.demo_split(dejavu)
    assert train and held and not {F.family(f) for f in train} & {F.family(f) for f in held}
    assert {F.family(f) for f in held} == {max(F.family(f) for f in dejavu)}  # the last family in name order
    one = [f for f in dejavu if F.family(f) == F.family(held[0])]  # one family: every fifth file held out
    assert F.demo_split(one) == ([f for k, f in enumerate(one) if k % 5], one[::5])
    assert F.demo_split(one[:1]) == (one[:1], one[:1])
    with pytest.raises(F.UsageError, match="no text fonts"):
        F.demo_split([])


def test_demo_options_augment_the_training_split_only():
    from data_tools.demo import DemoOptions
    opts = DemoOptions(slant=0.2, blur=0.5)
    assert opts.augmentation("train") == dict(slant=0.2, stretch=0.15, bold=0.3, blur=0.5)
    assert opts.augmentation("heldout") == opts.augmentation("val") == {}
    assert DemoOptions(augment=False).augmentation("train") == {}
    train = opts.synth_config(["a.ttf"], ["n.txt"], split="train", seed=4)
    held = opts.synth_config(["b.ttf"], ["n.txt"], split="heldout", seed=5, text_split="all")
    assert (train.fonts, train.seed, train.text_split, train.min_chars, train.words) == \
        (("a.ttf",), 4, "train", 3, None)
    assert train.augments and train.slant == 0.2 and not held.augments and held.text_split == "all"
    words = DemoOptions.for_task("words").synth_config([], [], split="val", seed=0)
    assert (words.width, words.words, words.min_chars, words.min_scale, words.layout) == (128, (1, 3), 2, 0.7, "random")


def test_plain_text_pasted_is_the_text_drawn_in_place():
    """Unaugmented samples paste ``_glyphs(..., None)``: the same pixels as drawing the text in place, edges too."""
    from PIL import ImageDraw

    import data_tools.synth_text as S
    for k, font in enumerate(F.text_fonts()[::7]):
        f = S._font(font, 14 + k % 9)
        for text, (x, y) in (("123", (5, 3)), ("Wgj 7", (-4, -6)), ("Af", (50, 20))):
            glyphs, bbox = S._glyphs(text, f, None), f.getbbox(text)
            pasted, drawn = Image.new("L", (64, 32), 0), Image.new("L", (64, 32), 0)
            pasted.paste(glyphs, (x + bbox[0], y + bbox[1]))
            ImageDraw.Draw(drawn).text((x, y), text, fill=255, font=f)
            assert glyphs.size == (bbox[2] - bbox[0], bbox[3] - bbox[1])
            assert pasted.tobytes() == drawn.tobytes(), (font, text)


def _ink_box(png: bytes) -> tuple[int, int, int, int] | None:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    ink = a < a.mean() - 40  # dark ink on light paper
    ys, xs = np.nonzero(ink)
    return None if not len(xs) else (xs.min(), ys.min(), xs.max(), ys.max())


def test_augmented_text_stays_whole_inside_the_image_and_is_recorded(monkeypatch):
    import data_tools.synth_text as S
    fonts = tuple(F.text_fonts()[:12])
    cfg = SynthConfig(fonts=fonts, corpus=(), height=32, width=64, min_chars=3, max_chars=3, palette="ink",
                      layout="centre", noise=0.0, max_rotation=1.0, min_scale=1.0, slant=0.3, stretch=0.2, bold=0.5,
                      blur=0.0)
    seen = Counter()
    for i in range(60):
        monkeypatch.setattr(S, "pick_text", lambda rng, c, i=i: f"{(i * 37) % 900 + 100}")
        members, meta = render_sample(cfg, i)
        box = _ink_box(members["png"])
        assert box is not None
        x0, y0, x1, y1 = box
        assert x0 >= 1 and y0 >= 0 and x1 <= 62 and y1 <= 31, (meta, box)  # nothing cut off at the edges
        assert abs(meta["slant"]) <= 0.3 and 0.8 <= meta["stretch"] <= 1.2 and meta["stroke"] in (0, 1)
        seen[meta["stroke"]] += 1
        assert members == render_sample(cfg, i)[0]  # a pure function of (config, index)
    assert seen[0] and seen[1]


def test_demo_trains_augmented_and_holds_out_plain_families(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-train", "120", "--num-heldout", "40", "--samples-per-shard", "60",
                 "--size", "16x32", "--no-progress"]) == 0
    metas = {}
    for split in ("train", "heldout"):
        metas[split] = []
        for shard in sorted((out / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                metas[split] += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                                 if m.name.endswith(".json")]
    assert all("slant" in m and "family" in m for m in metas["train"])
    assert all("slant" not in m and "family" in m for m in metas["heldout"])  # held-out: rendered plainly
    train_fams = {m["family"] for m in metas["train"]}
    held_fams = {m["family"] for m in metas["heldout"]}
    assert not train_fams & held_fams
    manifest = json.loads((out / "demo_manifest.json").read_text())["config"]
    assert manifest["options"]["augment"] is True and manifest["version"] == 3
    assert main(["demo", "--out", str(tmp_path / "plain"), "--num-train", "20", "--num-heldout", "10",
                 "--samples-per-shard", "60", "--size", "16x32", "--no-progress", "--no-augment"]) == 0
    with tarfile.open(next((tmp_path / "plain" / "train").glob("*.tar"))) as tar:
        assert not any("slant" in json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                       if m.name.endswith(".json"))


def test_evaluation_scores_each_family_beside_the_pool():
    from ett_ds.eval.tasks import CaptionTask
    recs = [{"ref": "123", "caption": "123", "group": "URW Gothic"}, {"ref": "456", "caption": "458", "group":
            "URW Gothic"}, {"ref": "789", "caption": "789", "group": "Liberation Sans"}, {"ref": "111", "caption": "111"}]
    out = CaptionTask(None, None, 8).summarize(recs, [])
    assert out["exact_match"] == 0.75
    assert out["by_group"] == {"Liberation Sans": {"n": 1, "exact_match": 1.0, "cer": 0.0},
                               "URW Gothic": {"n": 2, "exact_match": 0.5, "cer": pytest.approx(1 / 6)}}
    assert "by_group" not in CaptionTask(None, None, 8).summarize([{"ref": "1", "caption": "1"}], [])

"""The replication tool (experiments/replicate): statistics by hand, the data splits, bad input, and one tiny run of
every phase (grid on validation, two seeds, text-pretrained LLM) with a rerun that reuses and one that refuses."""
import json

import numpy as np
import pytest

from experiments.replicate import arms as A
from experiments.replicate import data as D
from experiments.replicate.cli import main as replicate
from experiments.replicate.stats import bootstrap, paired_difference


def test_bootstrap_interval_by_hand():
    const = bootstrap(np.full((3, 20), 0.4))
    assert const["mean"] == pytest.approx(0.4) and const["lo"] == pytest.approx(0.4) == const["hi"]
    # half the images right: mean 0.5, the interval is about +-1.96 * sqrt(.25 / 200) = +-0.069 wide
    half = bootstrap(np.tile(np.r_[np.ones(100), np.zeros(100)], (1, 1)))
    assert half["mean"] == 0.5 and 0.40 < half["lo"] < 0.46 and 0.54 < half["hi"] < 0.60
    # seeds that disagree widen the interval beyond the per-image one
    spread = bootstrap(np.stack([np.full(200, 0.2), np.full(200, 0.8)]))
    assert spread["lo"] == pytest.approx(0.2) and spread["hi"] == pytest.approx(0.8)
    a = [{"em": np.ones(10)}, {"em": np.ones(10)}]
    b = [{"em": np.zeros(10)}, {"em": np.r_[np.ones(5), np.zeros(5)]}]
    d = paired_difference(a, b, "em")  # seed 0 differs by 1 everywhere, seed 1 by 1 on half the images
    # a quarter of the draws take seed 0 twice (exactly 1.0); a quarter take seed 1 twice (about 0.5 +- 0.3)
    assert d["mean"] == pytest.approx(0.75) and 0.2 < d["lo"] < 0.6 and d["hi"] == pytest.approx(1.0)


def test_arm_records_name_their_runs():
    arms = A.final_arms((0.1, 0.3), 0.25, [1.0, 0.3], [(0.01, 1.0), (0.1, 0.3)], with_index=True, text=True)
    assert [a.name for a in arms] == ["index", "frozen", "und_only_r0.3", "und_only_r1", "ett_a0.1_r0.3",
                                      "ett_a0.25_r0.3", "ett_a0.01_r1", "text_frozen", "text_ett_a0.1_r0.3"]
    ett = arms[4]
    assert ett.tuned and ett.alpha == 0.1 and ett.tok_lr_ratio == 0.3 and ett.run(2) == "ett_a0.1_r0.3_s2"
    assert ett.align_run(2) == "align_embed_s2" and arms[-1].align_run(0) == "align_embed_text_s0"
    assert arms[0].align == "align_index" and not arms[1].tuned
    assert [c.name for c in A.grid([0.1], [0.3, 1.0], [(0.1, 1.0), (0.05, 0.1)])] == \
        ["ett_a0.1_r0.3", "ett_a0.1_r1", "ett_a0.05_r0.1"]


def test_splits_are_disjoint_by_family_and_string(tmp_path):
    train, held = D.demo_split()
    val, heldout = D.split_fonts(held)
    fams = [{D.file_family(f) for f in fs} for fs in (train, val, heldout)]
    if len(fams[1] | fams[2]) > 1:
        assert not fams[1] & fams[2]
    # without a second type family installed (fonts-liberation2) held-out falls back to DejaVu styles, and says so
    assert not fams[0] & (fams[1] | fams[2]) or D.shared_families(train, held) == ["DejaVu"]
    plan = D.build(tmp_path, task="numbers", image="16x32", digits=(3, 3), num={"train": 8, "val": 4, "heldout": 4},
                   spm_vocab=300, seed=0, allow_shared_family=bool(D.shared_families(train, held)))
    lines = {s: set((tmp_path / "corpus" / f"{s}.txt").read_text().split()) for s in ("val", "heldout")}
    assert lines["val"] and lines["heldout"] and not lines["val"] & lines["heldout"]
    assert all(D.text_bucket(t) == "heldout" for t in lines["val"] | lines["heldout"])
    assert plan["fonts"]["val"] and plan["fonts"]["heldout"]


def test_one_held_out_collection_is_split_by_file_family():
    """Two or more collections: the last validates; one: file families (``file_family``, finer than the name-table
    family that puts DejaVu Serif Condensed with DejaVu Serif), every third to val, the last of two."""
    assert D.split_fonts(["LiberationSans-Regular.ttf", "URWGothic-Book.otf", "LiberationMono-Bold.ttf"]) == \
        (["URWGothic-Book.otf"], ["LiberationSans-Regular.ttf", "LiberationMono-Bold.ttf"])
    serif = ["DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSerifCondensed-Bold.ttf"]
    assert D.split_fonts(serif) == (serif[2:], serif[:2])
    assert D.split_fonts(serif[:2]) == (serif[:2], serif[:2])


def test_held_out_sharing_the_training_family_is_an_error_unless_asked(tmp_path, monkeypatch):
    assert [D.collection(f) for f in ("/x/DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "LiberationSans-Regular.ttf",
                                      "LiberationMono-Italic.ttf", "Foo.ttf")] == \
        ["DejaVu", "DejaVu", "Liberation", "Liberation", "Foo"]
    train, held = D.demo_split()
    dejavu = [f for f in train + held if D.collection(f) == "DejaVu"]
    if len(dejavu) < 2:
        pytest.skip("needs two DejaVu fonts")
    monkeypatch.setattr(D, "demo_split", lambda: (dejavu[1:], dejavu[:1]))  # what a machine without Liberation sees
    kw = dict(task="numbers", image="16x32", digits=(3, 3), num={"train": 4, "val": 2, "heldout": 2}, spm_vocab=300,
              seed=0)
    with pytest.raises(D.UsageError, match="share the type family DejaVu.*fonts-liberation2 fonts-urw-base35.*"
                                           "--allow-shared-family"):
        D.build(tmp_path, **kw)
    assert D.build(tmp_path, **kw, allow_shared_family=True)["shared_family"] == ["DejaVu"]


def test_lookback_corpus_puts_the_caption_in_the_image_slots(tmp_path):
    """The look-back text (textlm.Lookback): the caption layout with the image slots filled by ordinary tokens from
    which the caption can be read: a noise-free grid holds each digit in its column block, copy holds the digits in
    order among filler, prior holds filler only; the loss starts at the caption."""
    import random

    from data_tools.spm import train_spm
    from ett_ds.data.text import TextTokenizer
    from experiments.replicate.textlm import Lookback
    caps = [f"{v:03d}" for v in range(100, 1000, 7)]
    (tmp_path / "c.txt").write_text("\n".join(caps) + "\n")
    train_spm([str(tmp_path / "c.txt")], str(tmp_path / "spm"), vocab_size=300, split_digits=True)
    text = TextTokenizer(tmp_path / "spm.model")
    lb = Lookback(text, caps, "Read the text.", 32, 8, 16)
    inv = {v: k for k, v in lb.digit.items()}
    assert len(inv) == 10 and lb.fillers and not set(lb.fillers) & set(inv)
    rng = random.Random(0)
    for kind in ("grid", "copy", "prior"):
        ids, start, _ = lb.sample(rng, kind)
        slots = ids[len(lb.head):len(lb.head) + 32]
        assert ids[:len(lb.head)] == lb.head and ids[len(lb.head) + 32:start] == lb.tail
        assert ids[-1] == text.eos_id and text.decode(ids[start:]).strip() in caps
        read = [inv[i] for i in slots if i in inv]
        if kind == "prior":
            assert not read
        if kind == "copy":
            assert "".join(map(str, read)) == text.decode(ids[start:]).strip()
    lb.slots(rng, "grid", [1, 2, 3])  # with every cell kept, each column holds one digit, blocks in order:
    rng2 = random.Random(1)
    rng2.uniform = lambda a, b: 1.0 if a == 0.55 else 0.0  # keep = 1, no jitter
    grid = lb.slots(rng2, "grid", [4, 5, 6])
    rows = [[inv.get(i) for i in grid[r * 8:(r + 1) * 8]] for r in range(4)]
    assert all(row == rows[0] for row in rows)
    blocks = [d for k, d in enumerate(rows[0]) if d is not None and (k == 0 or rows[0][k - 1] != d)]
    assert blocks == [4, 5, 6]


def test_small_defaults_to_the_setting_the_evidence_supports(tmp_path):
    from experiments.replicate.cli import parse_args
    a = parse_args(["--out", str(tmp_path)])  # --size small is the default
    assert (a.size, a.seeds, a.text_pretrain, a.text_full, a.random_arms, a.stage1_lr) == \
        ("small", 3, True, True, "frozen", 2e-3)
    assert (a.alpha, a.ratio, a.opts["steps1"], a.opts["steps0_max"], a.opts["text_steps"]) == (1.0, 0.8, 600, 1000, 2500)
    names = [x.name for x in A.final_arms((a.alpha, a.ratio), a.paper_alpha, with_index=a.index, text=a.text_pretrain,
                                          text_full=a.text_full, random_all=a.random_arms == "all")]
    assert names == ["frozen", "text_frozen", "text_und_only_r0.8", "text_ett_a1_r0.8", "text_ett_a0.25_r0.8"]
    # each size-dependent flag can still be set either way; tiny keeps the plain defaults
    b = parse_args(["--out", str(tmp_path), "--no-text-pretrain", "--seeds", "1", "--random-arms", "all"])
    assert (b.text_pretrain, b.seeds, b.random_arms) == (False, 1, "all")
    t = parse_args(["--size", "tiny", "--out", str(tmp_path)])
    assert (t.seeds, t.text_pretrain, t.text_full, t.random_arms, t.stage1_lr) == (1, False, False, "all", None)


@pytest.mark.parametrize("argv, msg", [(["--seeds", "0"], "--seeds must be >= 1"),
                                       (["--grid-alphas", "0.1"], "go together"),
                                       (["--refine", "0.1:1"], "go together"),
                                       (["--grid-alphas", "1", "--grid-ratios", "1", "--refine", "0.1"], "ALPHA:RATIO"),
                                       (["--grid-alphas", "x", "--grid-ratios", "1"], "comma-separated numbers"),
                                       (["--image", "32"], "HxW"),
                                       (["--stage1-curve", "1,9"], "--stage1-curve steps must lie")])
def test_bad_arguments_are_one_line_errors(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        replicate(["--size", "tiny", "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert msg in err[-1]


@pytest.mark.slow
def test_tiny_run_every_phase_then_reuse_and_refuse(tmp_path):
    out = tmp_path / "rep"
    argv = ["--size", "tiny", "--out", str(out), "--seeds", "2", "--grid-alphas", "0.1,0.25", "--grid-ratios", "0.3",
            "--text-pretrain", "--und-ratios", "1", "--allow-shared-family", "--stage1-curve", "1,2"]
    assert replicate(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for f in ("results.md", "em_vs_dpsnr.png", "stage0_curve.png"):
        assert (out / f).stat().st_size > 0, f
    assert list(res["grid"]["arms"]) == ["frozen", "ett_a0.1_r0.3", "ett_a0.25_r0.3"]
    assert res["grid"]["selection"]["chosen"] in res["grid"]["arms"]
    final = res["final"]["arms"]
    assert set(final) >= {"frozen", "text_frozen", "und_only_r0.3", "und_only_r1"} and len(final) in (6, 7)
    for name, r in final.items():
        assert r["stats"]["em"]["seeds"] == 2 and r["stats"]["em"]["images"] == 16, name
        for m in ("em", "cer", "dpsnr"):
            s = r["stats"][m]
            assert s["lo"] - 1e-9 <= s["mean"] <= s["hi"] + 1e-9, (name, m)
        if not r["tuned"]:  # a frozen tokenizer reconstructs exactly like stage 0
            assert r["stats"]["dpsnr"]["mean"] == 0.0 == r["stats"]["dpsnr"]["hi"]
    assert (out / "text_llm" / "config.json").is_file()
    tp = res["text_pretrain"]
    assert tp["plan"]["corpus"] == "lookback" and set(tp["exact_match"]) == {"grid", "copy", "prior"}
    assert set(res["stage1"]) == {"random", "text"} and set(res["stage1"]["text"]["points"]) == {"1", "2"}
    assert "Stage 1 alone (projector only, LLM frozen)" in (out / "results.md").read_text()
    cfg = json.loads((out / "runs" / "text_frozen_s1" / "replicate_stage.json").read_text())["overrides"]
    assert f"model.llm.path={out / 'text_llm'}" in cfg
    assert res["stage0"]["stopped_at"] in (2, 4) and set(res["stage0"]["curve"]) >= {"2"}
    md = (out / "results.md").read_text()
    assert "Grid at the first seed, validation split" in md and "(chosen): EM − frozen" in md
    # a rerun reuses every stage (no training: no timings), a changed lr is refused
    assert replicate(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["timings_s"] == {} and again["final"]["arms"]["frozen"]["stats"] == \
        final["frozen"]["stats"]
    with pytest.raises(SystemExit, match="trained with other settings.*optim.lr=0.002"):
        replicate([*argv, "--lr", "2e-3"])

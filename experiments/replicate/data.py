"""The three splits of the replication, built with data_tools' own pieces (fonts, corpora, renderer, hash split).

- ``train``: the training fonts (``data_tools.demo.find_fonts``' first list: every text font but the held-out
  collections), augmented as the demo's, captions of the train bucket of
  data_tools' stable caption hash (``synth_text.text_bucket``);
- ``val`` and ``heldout``: the held-out fonts, split again by family (every third family to ``val``), and the
  held-out caption bucket, split again by a second hash (task ``numbers``: each string is in exactly one of val and
  held-out; task ``words``: both draw from the held-out bucket). The setting is chosen on ``val``; results are
  reported on ``heldout``, which differs from training by font family and by string, and from ``val`` by family.
- a sentencepiece model on the training captions (digits split for ``numbers``, as ``data_tools demo`` does).
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from data_tools.demo import DemoOptions, find_corpus, find_fonts, numbers_corpus
from data_tools.errors import UsageError
from data_tools.fonts import collection
from data_tools.spm import train_spm
from data_tools.synth_text import SynthConfig, load_corpus, synth_text, text_bucket

SPLITS = ("train", "val", "heldout")


def family(font: str) -> str:
    return Path(font).stem.split("-")[0]


HELDOUT_PACKAGE = "fonts-liberation2"


def shared_families(train_fonts: list[str], other_fonts: list[str]) -> list[str]:
    """Type families (``collection``) that ``other_fonts`` share with ``train_fonts``."""
    return sorted({collection(f) for f in train_fonts} & {collection(f) for f in other_fonts})


def check_families(train_fonts: list[str], held_fonts: list[str], allow_shared: bool) -> list[str]:
    """The shared families; a UsageError naming the package to install unless ``allow_shared``."""
    shared = shared_families(train_fonts, held_fonts)
    if shared and not allow_shared:
        raise UsageError(f"validation/held-out fonts share the type family {', '.join(shared)} with training "
                         f"(no second family installed): apt-get install -y {HELDOUT_PACKAGE}, or pass "
                         f"--allow-shared-family")
    return shared


def split_fonts(heldout_fonts: list[str]) -> tuple[list[str], list[str]]:
    """(val fonts, held-out fonts): whole collections apart when there are two or more (the last to val: URW Gothic
    validates, Liberation is held out), else whole families, every third family to val; one family: both get it."""
    cols = sorted({collection(f) for f in heldout_fonts})
    if len(cols) > 1:
        return ([f for f in heldout_fonts if collection(f) == cols[-1]],
                [f for f in heldout_fonts if collection(f) != cols[-1]])
    fams = sorted({family(f) for f in heldout_fonts})
    if len(fams) < 2:
        return list(heldout_fonts), list(heldout_fonts)
    val_fams = set(fams[2::3] or fams[-1:])
    return ([f for f in heldout_fonts if family(f) in val_fams],
            [f for f in heldout_fonts if family(f) not in val_fams])


def val_string(text: str) -> bool:
    """Second, independent stable hash over the held-out caption bucket: half of it validates."""
    return text_bucket("val|" + text, 50) == "heldout"


def build(root: Path, *, task: str, image: str, digits: tuple[int, int], num: dict, spm_vocab: int, seed: int,
          workers: int = 1, allow_shared_family: bool = False) -> dict:
    """Render the splits into ``root`` (skipped when ``root/data.json`` records the same plan); returns the plan.

    Validation and held-out must come from another type family than training (``check_families``); with
    ``allow_shared_family`` a shared one is accepted and recorded in the plan (``shared_family``)."""
    h, w = (int(v) for v in image.split("x"))
    opts = DemoOptions.for_task(task, height=h, width=w, min_digits=digits[0], max_digits=digits[1], seed=seed)
    train_fonts, held = find_fonts()
    shared = check_families(train_fonts, held, allow_shared_family)
    val_fonts, held_fonts = split_fonts(held)
    numbers = task == "numbers"
    corpus = (numbers_corpus(root / "corpus" / "numbers.txt", *digits) if numbers else find_corpus())
    plan = {"task": task, "options": asdict(opts), "num": num, "spm_vocab": spm_vocab, "corpus": corpus,
            "fonts": {"train": [Path(f).name for f in train_fonts], "val": [Path(f).name for f in val_fonts],
                      "heldout": [Path(f).name for f in held_fonts]}, "version": 2}
    if shared:
        plan["shared_family"] = shared
    record = root / "data.json"
    if record.is_file() and json.loads(record.read_text()).get("plan") == plan:
        return plan
    corpora = {"train": (corpus, "train")}
    if numbers:  # held-out bucket split again by string: val and held-out never share a caption
        held_lines = [t for t in load_corpus(tuple(corpus)) if text_bucket(t) == "heldout"]
        for split, keep in (("val", True), ("heldout", False)):
            path = root / "corpus" / f"{split}.txt"
            path.write_text("".join(t + "\n" for t in held_lines if val_string(t) == keep))
            corpora[split] = ([str(path)], "all")
    else:
        corpora["val"] = corpora["heldout"] = (corpus, "heldout")
    base = SynthConfig(fonts=(), corpus=(), height=h, width=w, min_chars=digits[0] if numbers else 2,
                       max_chars=digits[1] if numbers else opts.max_chars,
                       words=None if numbers else (opts.min_words, opts.max_words), noise=opts.noise,
                       max_rotation=opts.max_rotation, palette=opts.palette, layout=opts.layout,
                       min_scale=1.0 if opts.layout == "centre" else 0.7)
    fonts = {"train": train_fonts, "val": val_fonts, "heldout": held_fonts}
    for k, split in enumerate(SPLITS):
        files, text_split = corpora[split]
        cfg = replace(base, fonts=tuple(fonts[split]), corpus=tuple(files), seed=seed + k, text_split=text_split)
        if split == "train" and opts.augment:  # as the demo: several families, augmented; val / held-out plain
            cfg = replace(cfg, slant=opts.slant, stretch=opts.stretch, bold=opts.bold, blur=opts.blur)
        synth_text(cfg, root / split, num=num[split], prefix=split, samples_per_shard=500, workers=workers,
                   overwrite=True, progress=False)
    train_spm([str(root / "train")], str(root / "spm"), vocab_size=spm_vocab, seed=seed, split_digits=numbers)
    record.write_text(json.dumps({"plan": plan}, indent=1))
    return plan

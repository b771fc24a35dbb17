"""The three splits of the replication and their text tokenizer, built with data_tools' own pieces (the demo's
options and font split, its corpora, the renderer, the caption hash split), into one folder.

- ``train``: the demo's training fonts (``data_tools.fonts.demo_split``: every text font but the held-out
  collections), augmented as the demo's (``DemoOptions.augmentation``), captions of the train bucket of the stable
  caption hash (``synth_text.text_bucket``);
- ``val`` and ``heldout``: the demo's held-out fonts split again (``split_fonts``): by collection when there are two
  or more (URW Gothic validates, Liberation is held out), else by file family, every third to ``val``; rendered
  plainly. Captions: task ``numbers``, the held-out bucket split again by a second hash (``val_string``), so each
  string is in exactly one of val and held-out; task ``words``, both draw from the held-out bucket. The setting is
  chosen on ``val``; results are reported on ``heldout``, which differs from training by font and by string.
- fonts of the training collections in val / held-out (no held-out collection installed) are an error naming
  ``HELDOUT_PACKAGES`` unless asked for (``check_families``); the plan then records them (``shared_family``);
- ``spm.model``: sentencepiece on the training captions (digits split for ``numbers``, as ``data_tools demo`` does);
- ``data.json``: the plan; a second ``build`` with the same plan does nothing.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from data_tools.demo import DemoOptions, find_corpus, numbers_corpus
from data_tools.errors import UsageError
from data_tools.fonts import HELDOUT_PACKAGES, collection, demo_split
from data_tools.spm import train_spm
from data_tools.synth_text import load_corpus, synth_text, text_bucket

SPLITS = ("train", "val", "heldout")


def file_family(font: str) -> str:
    """The family a font's file name gives: its stem up to the first ``-`` (``DejaVuSansCondensed-Bold.ttf`` ->
    ``DejaVuSansCondensed``, ``FreeMonoBold.ttf`` -> ``FreeMonoBold``). Finer than ``data_tools.fonts.family``
    (the name the font's tables give: "DejaVu Sans" for DejaVuSans and DejaVuSansCondensed alike), so a split by
    it differs."""
    return Path(font).stem.split("-")[0]


def shared_families(train_fonts: list[str], other_fonts: list[str]) -> list[str]:
    """Type families (``collection``) that ``other_fonts`` share with ``train_fonts``."""
    return sorted({collection(f) for f in train_fonts} & {collection(f) for f in other_fonts})


def check_families(train_fonts: list[str], held_fonts: list[str], allow_shared: bool) -> list[str]:
    """The shared families; a UsageError naming the packages to install unless ``allow_shared``."""
    shared = shared_families(train_fonts, held_fonts)
    if shared and not allow_shared:
        raise UsageError(f"validation/held-out fonts share the type family {', '.join(shared)} with training "
                         f"(no held-out collection installed): apt-get install -y {' '.join(HELDOUT_PACKAGES.values())}"
                         f", or pass --allow-shared-family")
    return shared


def split_fonts(heldout_fonts: list[str]) -> tuple[list[str], list[str]]:
    """(val fonts, held-out fonts): whole collections apart when there are two or more (the last to val: URW Gothic
    validates, Liberation is held out), else whole file families (``file_family``), every third family to val (the
    last when there are two); one family: both get it."""
    cols = sorted({collection(f) for f in heldout_fonts})
    if len(cols) > 1:
        return ([f for f in heldout_fonts if collection(f) == cols[-1]],
                [f for f in heldout_fonts if collection(f) != cols[-1]])
    fams = sorted({file_family(f) for f in heldout_fonts})
    if len(fams) < 2:
        return list(heldout_fonts), list(heldout_fonts)
    val_fams = set(fams[2::3] or fams[-1:])
    return ([f for f in heldout_fonts if file_family(f) in val_fams],
            [f for f in heldout_fonts if file_family(f) not in val_fams])


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
    train_fonts, held = demo_split()
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
    fonts = {"train": train_fonts, "val": val_fonts, "heldout": held_fonts}
    for k, split in enumerate(SPLITS):  # as the demo: training augmented, val / held-out plain
        files, text_split = corpora[split]
        cfg = opts.synth_config(fonts[split], files, split=split, seed=seed + k, text_split=text_split)
        synth_text(cfg, root / split, num=num[split], prefix=split, samples_per_shard=500, workers=workers,
                   overwrite=True, progress=False)
    train_spm([str(root / "train")], str(root / "spm"), vocab_size=spm_vocab, seed=seed, split_digits=numbers)
    record.write_text(json.dumps({"plan": plan}, indent=1))
    return plan

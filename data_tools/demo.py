"""``data_tools demo --out DIR``: the built-in data the tiny recipe trains on, in one call.

Tasks: ``numbers`` (the default) renders 3-digit numbers in dark ink on light paper, centred at the largest size
that fits a 32x64 image: a task that the tiny recipe learns to read, reconstruct and draw within minutes on two CPU
cores (with text placed and sized at random, its randomly initialised LLM needed several times more steps). ``words`` renders 1-3 words of WordNet
glosses (or the shipped phrase list) in random colours, 32x128: far harder, for longer runs.

Layout::

    DIR/train/demo-000000.tar ...    synth-text, training fonts, training half of the caption hash split
    DIR/heldout/demo-000000.tar ...  held-out font collections (never in train/), held-out captions
    DIR/spm.model, DIR/spm.vocab     sentencepiece trained on the training captions
    DIR/heldout_vqa.jsonl            VQA questions on the held-out images (DIR/heldout_vqa/KEY.png), 10 answers each
    DIR/README.txt, DIR/demo_manifest.json

Held out twice over: by font family (below) and by string (the held-out bucket of a stable hash of the caption, so
no held-out caption is ever rendered in train/).

Fonts (``data_tools/fonts.py``): every text font the machine has trains, except two held-out collections,
Liberation (fonts-liberation2) and URW Gothic (fonts-urw-base35), each reported on its own (``family`` in every
sample's json); with DejaVu alone one DejaVu family is held out. Training images are augmented (slant, width,
stroke weight, blur, on top of the palette's ink/paper and noise variation; ``--no-augment`` turns it off);
held-out images are rendered plainly. Text (``words``): WordNet glosses when
``wordnet-base`` is installed, else the phrase list shipped in ``data_tools/assets/phrases.txt``. The manifest
records every option and the fonts/corpus used; a second call with the same options finds it and does nothing.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError
from .fonts import demo_split
from .instruct import read_samples
from .spm import train_spm
from .synth_text import SynthConfig, synth_text

ASSETS = Path(__file__).with_name("assets")
WORDNET = Path("/usr/share/wordnet")


TASKS = ("numbers", "words")


@dataclass(frozen=True)
class DemoOptions:
    task: str = "numbers"
    num_train: int = 4000
    num_heldout: int = 200
    height: int = 32
    width: int = 64
    min_words: int = 1            # words: words per caption
    max_words: int = 3
    max_chars: int = 16
    min_digits: int = 3           # numbers: digits per caption
    max_digits: int = 3
    palette: str = "ink"          # see data_tools.synth_text.pick_colours
    layout: str = "centre"        # centred at the largest size that fits (random: anywhere, 70-100 % of it)
    noise: float = 4.0
    max_rotation: float = 1.0
    seed: int = 0
    samples_per_shard: int = 500
    vocab_size: int = 512
    augment: bool = True          # training split only: slant, stretch, bold, blur below
    slant: float = 0.25
    stretch: float = 0.15
    bold: float = 0.3
    blur: float = 0.6

    @classmethod
    def for_task(cls, task: str, **overrides) -> "DemoOptions":
        """The task's defaults (``words``: the harder 32x128 colour set), then ``overrides``."""
        if task not in TASKS:
            raise UsageError(f"unknown demo task {task!r}; choose one of {', '.join(TASKS)}")
        base = {"words": dict(width=128, palette="any", layout="random", noise=12.0, max_rotation=3.0)}.get(task, {})
        return cls(task=task, **{**base, **overrides})

    def augmentation(self, split: str) -> dict:
        """``SynthConfig``'s augmentation knobs for ``split``: these options' slant, stretch, bold and blur for
        ``train`` (none with ``augment`` off); none for any other split, which is rendered plainly."""
        if not (self.augment and split == "train"):
            return {}
        return dict(slant=self.slant, stretch=self.stretch, bold=self.bold, blur=self.blur)

    def synth_config(self, fonts, corpus, *, split: str, seed: int, text_split: str | None = None) -> SynthConfig:
        """How ``split`` is rendered in ``fonts`` from ``corpus``: the task's text lengths, image, palette, layout and
        noise, and ``augmentation(split)``; captions from the ``text_split`` bucket (default: ``split``'s)."""
        numbers = self.task == "numbers"
        return SynthConfig(fonts=tuple(fonts), corpus=tuple(corpus), height=self.height, width=self.width,
                           min_chars=self.min_digits if numbers else 2,
                           max_chars=self.max_digits if numbers else self.max_chars,
                           words=None if numbers else (self.min_words, self.max_words), seed=seed,
                           text_split=split if text_split is None else text_split, noise=self.noise,
                           max_rotation=self.max_rotation, palette=self.palette, layout=self.layout,
                           min_scale=1.0 if self.layout == "centre" else 0.7, **self.augmentation(split))


def find_corpus() -> list[str]:
    wn = [str(WORDNET / f"data.{pos}") for pos in ("noun", "verb", "adj", "adv")]
    wn = [p for p in wn if Path(p).is_file()]
    return wn or [str(ASSETS / "phrases.txt")]


def numbers_corpus(path: Path, min_digits: int, max_digits: int) -> list[str]:
    """Every number with min_digits..max_digits digits, one per line (the ``numbers`` task's text)."""
    if not 1 <= min_digits <= max_digits <= 6:
        raise UsageError(f"digits must satisfy 1 <= min <= max <= 6, got {min_digits}-{max_digits}")
    lo = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{v}\n" for v in range(lo, 10 ** max_digits)))
    return [str(path)]


def build_demo(out: str | Path, opts: DemoOptions = DemoOptions(), *, workers: int = 1, progress: bool = True,
               force: bool = False) -> dict:
    out = Path(out)
    if opts.task not in TASKS:
        raise UsageError(f"unknown demo task {opts.task!r}; choose one of {', '.join(TASKS)}")
    train_fonts, heldout_fonts = demo_split()
    corpus = (numbers_corpus(out / "numbers.txt", opts.min_digits, opts.max_digits) if opts.task == "numbers"
              else find_corpus())
    manifest = {"options": asdict(opts), "train_fonts": [Path(f).name for f in train_fonts],
                "heldout_fonts": [Path(f).name for f in heldout_fonts], "corpus": corpus, "version": 3}
    manifest_path = out / "demo_manifest.json"
    if not force and manifest_path.exists() and (out / "spm.model").exists():
        old = json.loads(manifest_path.read_text())
        if old.get("config") == manifest:
            vqa = write_vqa_split(out, opts.task)  # folders built before the VQA split gain it here
            return {**old["summary"], "heldout_vqa_questions": vqa, "skipped": True}
    t0 = time.time()
    if out.exists():
        for sub in ("train", "heldout"):
            shutil.rmtree(out / sub, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    numbers = opts.task == "numbers"
    common = dict(prefix="demo", samples_per_shard=opts.samples_per_shard, workers=workers, progress=progress)
    train = synth_text(opts.synth_config(train_fonts, corpus, split="train", seed=opts.seed), out / "train",
                       num=opts.num_train, **common)
    heldout = synth_text(opts.synth_config(heldout_fonts, corpus, split="heldout", seed=opts.seed + 1),
                         out / "heldout", num=opts.num_heldout, **common)
    spm = train_spm([str(out / "train")], str(out / "spm"), vocab_size=opts.vocab_size, seed=opts.seed,
                    split_digits=numbers)
    summary = {"out": str(out), "train_samples": train["ok"], "train_shards": train["shards"],
               "heldout_samples": heldout["ok"], "heldout_shards": heldout["shards"],
               "spm_vocab_size": spm["vocab_size"], "train_fonts": len(train_fonts),
               "heldout_fonts": len(heldout_fonts),
               "corpus": "numbers" if numbers else "wordnet" if "wordnet" in corpus[0] else "phrases",
               "seconds": round(time.time() - t0, 1)}
    summary["heldout_vqa_questions"] = write_vqa_split(out, opts.task, rebuild=True)
    (out / "README.txt").write_text(_readme(opts, manifest, summary))
    manifest_path.write_text(json.dumps({"config": manifest, "summary": summary}, indent=1, sort_keys=True))
    return {**summary, "skipped": False}


VQA_QUESTIONS = {"numbers": (("What is the first digit?", lambda t: t[0]), ("What is the last digit?", lambda t: t[-1]),
                             ("What number is shown?", lambda t: t)),
                 "words": (("What is written in the image?", lambda t: t),)}


def write_vqa_split(out: Path, task: str, rebuild: bool = False) -> int:
    """``heldout_vqa.jsonl`` + ``heldout_vqa/KEY.png`` from the held-out shards: per image the task's questions, each
    with 10 identical answers (``ett_ds.evaluate --tasks vqa``). Kept when present unless ``rebuild``; the JSONL is
    written last, under a temporary name, so it only exists complete. Returns the number of questions."""
    jsonl, images = out / "heldout_vqa.jsonl", out / "heldout_vqa"
    if jsonl.exists() and not rebuild:
        return sum(1 for line in jsonl.read_text().splitlines() if line.strip())
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    rows = []
    for shard in sorted((out / "heldout").glob("*.tar")):
        for key, members in read_samples(shard):
            text = members.get("txt", b"").decode("utf-8").strip()
            if not text or "png" not in members:
                continue
            (images / f"{key}.png").write_bytes(members["png"])
            for k, (question, answer) in enumerate(VQA_QUESTIONS[task]):
                rows.append({"question_id": f"{key}_{k}", "image": f"heldout_vqa/{key}.png", "question": question,
                             "answers": [answer(text)] * 10})
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(jsonl)
    return len(rows)


def _readme(opts: DemoOptions, manifest: dict, summary: dict) -> str:
    n_train, n_held = summary["train_shards"], summary["heldout_shards"]
    return f"""ett_ds demo data (built by `python -m data_tools demo`)

Task ({opts.task}): read the text rendered in each {opts.height}x{opts.width} (HxW) image; the caption (txt member) is
exactly the rendered string ({f"{opts.min_digits}-{opts.max_digits} digit numbers, layout {opts.layout}" if opts.task == "numbers" else
f"{opts.min_words}-{opts.max_words} words, at most {opts.max_chars} characters"}; palette {opts.palette}).

train/    demo-{{000000..{n_train - 1:06d}}}.tar  {summary['train_samples']} samples, fonts: {', '.join(manifest['train_fonts'])}
heldout/  demo-{{000000..{n_held - 1:06d}}}.tar  {summary['heldout_samples']} samples, fonts: {', '.join(manifest['heldout_fonts'])}
          captions come from the held-out bucket of a stable hash split, so none of them occurs in train/.
spm.model sentencepiece (byte fallback; pad=0 unk=1 bos=2 eos=3), vocabulary {summary['spm_vocab_size']}, trained on train/ captions.
Text source: {', '.join(manifest['corpus'])}

Each sample: KEY.png, KEY.txt (caption), KEY.json (text, font, family, font_px, angle, seed, index; train/ also the
augmentation drawn: slant, stretch, stroke). Training images are augmented: {"off" if not opts.augment else
f"slant <= {opts.slant}, width x [{1 - opts.stretch:g}, {1 + opts.stretch:g}], bold {opts.bold:.0%}, blur <= {opts.blur} px"}.
heldout_vqa.jsonl: {summary.get('heldout_vqa_questions', 0)} questions about the held-out images (heldout_vqa/KEY.png), 10 identical answers
          each: python -m ett_ds.evaluate --ckpt RUN --data heldout_vqa.jsonl --tasks vqa --out vqa.json
sizes.json / stats.json in each split directory follow open_clip's conventions.
"""

"""Issue 22 item 1: an export is one transformers model with its own code, usable without ett_ds.

The snippet of docs/inference.md (and issue 22) (AutoProcessor + AutoModelForImageTextToText, trust_remote_code, greedy generate,
batch_decode) runs in a fresh virtual environment holding only transformers, torch, safetensors, sentencepiece,
Pillow and what they depend on (symlinked from this environment; ett_ds is not among them, and the script checks
that ``import ett_ds`` fails), with ``python -I`` from a folder outside the repository. Its caption must be the one
``python -m ett_ds.infer caption`` prints for the same export and image, its prompt ids training's, its
``AutoTokenizer`` ids training's (a sentencepiece run on a Qwen2 LLM, where transformers' own choice would be its
byte-level Qwen2Tokenizer), a t2i checkpoint's ``generate_image`` the PNG of ``ett_ds.infer generate``, and an sft
checkpoint's replies those of ``ett_ds.infer chat``.
"""
import importlib.metadata as md
import io
import json
import re
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ett_ds import export, infer
from ett_ds.data.batch import Batcher
from ett_ds.data.text import PROBES, TextTokenizer
from ett_ds.engine import dist
from ett_ds.generation import _image_tokens, chat_prompt, first_user_turn
from ett_ds.models.loading import load_model
from tests.stage_batches import smooth_images, trained_checkpoint
from tests.tiny import train_spm

CLEAN_PACKAGES = ("transformers", "torch", "safetensors", "sentencepiece", "pillow")
PROMPT = "Read the text."
TOKEN_PROBES = list(PROBES) + ["A cow.", "the quick brown fox 123"]

# What a user runs (docs/inference.md's snippet), plus what the test compares: the prompt ids, the first step's logits,
# AutoTokenizer's ids, chat replies and a generated image.
SCRIPT = r'''
import json
import sys

try:
    import ett_ds  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("ett_ds is importable in the clean environment")
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

job = json.loads(sys.argv[1])
path, image = job["path"], Image.open(job["image"])

proc = AutoProcessor.from_pretrained(path, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
inputs = proc(images=image, text="Read the text.", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
caption = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

import torch
with torch.no_grad():
    logits = model(**inputs).logits[0, -1].tolist()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
report = {"caption": caption, "prompt_ids": inputs["input_ids"][0].tolist(), "logits": logits,
          "tokenizer": type(tok).__name__, "len": len(tok),
          "ids": [tok.encode(t, add_special_tokens=False) for t in job["probes"]],
          "ett_ds_modules": sorted(m for m in sys.modules if m.split(".")[0] == "ett_ds")}
if job.get("chat"):
    conversation, replies = [], []
    for k, message in enumerate(job["chat"]):
        conversation.append({"role": "user", "content": ("<image>\n" if k == 0 else "") + message})
        inputs = proc(images=image, conversation=conversation, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        replies.append(proc.decode(out[0, inputs["input_ids"].shape[1]:]))
        conversation.append({"role": "assistant", "content": replies[-1]})
    report["chat"] = replies
if job.get("png"):
    pixels = model.generate_image(**proc.image_inputs("red fox"), cfg_scale=3.0, top_k=50, seed=1)
    proc.postprocess_images(pixels)[0].save(job["png"])
print("RESULT " + json.dumps(report))
'''


def clean_python(root: Path) -> Path:
    """A new virtual environment whose site-packages holds (as symlinks) CLEAN_PACKAGES and their dependencies."""
    from packaging.requirements import Requirement
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    site = next(root.glob("lib/python*/site-packages"))
    todo, seen = list(CLEAN_PACKAGES), {}
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen[key] = dist_ = md.distribution(name)
        for r in dist_.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    assert "ett-ds" not in seen and "deepspeed" not in seen
    for dist_ in seen.values():
        base = Path(dist_.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist_.files or []}:
            if top in ("..", "bin", "__pycache__") or top.endswith(".pth"):
                continue  # .pth files (editable installs, hooks) stay out
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    return root / "bin" / "python"


def run_clean(python: Path, job: dict, cwd: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(python), "-I", "-c", SCRIPT, json.dumps(job)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    dist.init_distributed()
    root = tmp_path_factory.mktemp("hfx")
    spm = train_spm(root / "spm")
    img = root / "img.png"
    px = smooth_images(1, 40, 56, seed=5)
    Image.fromarray(((px[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(img)
    work = root / "outside"  # the subprocesses' cwd: not the repository
    work.mkdir()
    return {"root": root, "spm": spm, "image": img, "work": work, "python": clean_python(root / "venv")}


def exported(env, stage: str, steps: int, *overrides: str) -> Path:
    _, step = trained_checkpoint(env["spm"], env["root"] / f"run_{stage}", stage, steps, *overrides)
    out = env["root"] / f"export_{stage}"
    assert export.main(["--ckpt", str(step), "--out", str(out)]) == 0
    return out


def infer_out(args: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> list[str]:
    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert infer.main(args + ["--device", "cpu", "--max-new-tokens", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    if args[0] == "caption":  # FILE<TAB>caption
        images = args[args.index("--image") + 1:][:len(lines)]
        assert [line.split("\t", 1)[0] for line in lines] == images
        lines = [line.split("\t", 1)[1] for line in lines]
    return lines


def reference_logits(out: Path, image: Path, ids: list[int]) -> torch.Tensor:
    loaded = load_model(out)
    pixels = infer.read_images([str(image)], tuple(loaded.cfg.data.image_size), loaded.cfg.data.resize_mode)
    m = loaded.model
    with torch.no_grad():
        t = torch.tensor([ids])
        hidden = m.llm_hidden(m.embed_inputs(t, _image_tokens(m, pixels)), torch.ones_like(t))
        return m.llm.get_output_embeddings()(hidden[:, -1])[0].float()


@pytest.mark.slow
def test_snippet_without_ett_ds_captions_like_infer_and_generates_like_infer(env, capsys, tmp_path):
    out = exported(env, "t2i", 10, "optim.lr=3e-3", "optim.projector_lr=3e-3")
    cli = infer_out(["caption", "--ckpt", str(out), "--image", str(env["image"]), "--prompt", PROMPT], capsys)
    assert infer.main(["generate", "--ckpt", str(out), "--prompt", "red fox", "--out", str(tmp_path / "ett.png"),
                       "--top-k", "50", "--seed", "1", "--device", "cpu"]) == 0
    r = run_clean(env["python"], {"path": str(out), "image": str(env["image"]), "probes": TOKEN_PROBES,
                                  "png": str(tmp_path / "hf.png")}, env["work"])
    print("infer caption:", cli, "| transformers caption:", r["caption"])
    assert r["ett_ds_modules"] == []
    assert r["caption"] == cli and cli[0]
    loaded = load_model(out)
    text = loaded.text
    assert r["prompt_ids"] == Batcher(loaded.cfg, text, train=False).caption_prompt(PROMPT)
    torch.testing.assert_close(torch.tensor(r["logits"]), reference_logits(out, env["image"], r["prompt_ids"]),
                               rtol=1e-4, atol=1e-4)
    # AutoTokenizer gives training's ids (transformers alone would pick its byte-level Qwen2Tokenizer here)
    assert r["tokenizer"] == "ETTSentencePieceTokenizer" and r["len"] == text.vocab_size
    assert r["ids"] == [text.encode(t) for t in TOKEN_PROBES]
    assert r["ids"][TOKEN_PROBES.index("A cow.")] == TextTokenizer(env["spm"]).encode("A cow.")
    # generate_image with the same seed draws the same codes: the same PNG
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("ett.png", "hf.png"))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # ett_ds still reads the folder, and the LLM's weights are stored once (llm/), referenced by the index
    assert load_model(out).kind == "export"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == {"llm/model.safetensors", "vision.safetensors"}
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_sft_checkpoint_answers_in_its_chat_layout_without_ett_ds(env, capsys, monkeypatch):
    out = exported(env, "sft", 2)
    cli = infer_out(["caption", "--ckpt", str(out), "--image", str(env["image"]), "--prompt", PROMPT], capsys)
    questions = ["What is the first digit?", "How many digits?"]
    chat = infer_out(["chat", "--ckpt", str(out), "--image", str(env["image"])], capsys,
                     "\n".join(questions) + "\n", monkeypatch)
    r = run_clean(env["python"], {"path": str(out), "image": str(env["image"]), "probes": ["A cow."],
                                  "chat": questions}, env["work"])
    print("infer caption:", cli, "chat:", chat, "| transformers:", r["caption"], r["chat"])
    assert r["caption"] == cli and r["chat"] == chat
    loaded = load_model(out)
    assert r["prompt_ids"] == chat_prompt(loaded.model, loaded.text, [first_user_turn(PROMPT)])
    torch.testing.assert_close(torch.tensor(r["logits"]), reference_logits(out, env["image"], r["prompt_ids"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_hf_tokenizer_run_without_ett_ds(env, capsys):
    """A run on an HF LLM folder with its own (byte-level BPE) tokenizer: AutoTokenizer / AutoProcessor on the export
    give that tokenizer with the image tokens, at training's ids; the snippet's caption is infer's."""
    from tests.test_llm_loading import make_hf_folder
    make_hf_folder(env["root"] / "qwen")
    out = exported(env, "frozen", 1, f"model.llm.path={env['root'] / 'qwen'}", "model.llm.init_config=null",
                   "model.llm.text_tokenizer=null")
    cli = infer_out(["caption", "--ckpt", str(out), "--image", str(env["image"]), "--prompt", PROMPT], capsys)
    r = run_clean(env["python"], {"path": str(out), "image": str(env["image"]), "probes": TOKEN_PROBES},
                  env["work"])
    loaded = load_model(out)
    assert loaded.text.kind == "hf"
    assert r["caption"] == cli
    assert r["ids"] == [loaded.text.encode(t) for t in TOKEN_PROBES] and r["len"] == loaded.text.vocab_size
    assert r["prompt_ids"] == Batcher(loaded.cfg, loaded.text, train=False).caption_prompt(PROMPT)
    torch.testing.assert_close(torch.tensor(r["logits"]), reference_logits(out, env["image"], r["prompt_ids"]),
                               rtol=1e-4, atol=1e-4)


def test_remote_code_imports_nothing_from_ett_ds():
    from ett_ds.hf import FILES, HERE
    for name in FILES:
        source = (HERE / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+ett_ds", source, re.M), name
        assert not re.search(r"^\s*from\s+\.\.", source, re.M), name  # relative imports stay inside the folder


def test_processor_fits_images_like_ett_ds(tmp_path):
    """The remote processor's image fitting is ett_ds's (crop / pad / stretch, odd sizes, alpha, grey)."""
    from ett_ds.data.transforms import image_to_tensor
    from ett_ds.hf.processing_ett import image_to_tensor as hf_image_to_tensor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (80, 24, 4), dtype=np.uint8), mode="RGBA"),
              Image.fromarray(rng.integers(0, 256, (16, 32), dtype=np.uint8), mode="L")]
    for img in images:
        for mode in ("crop", "pad", "stretch"):
            assert torch.equal(hf_image_to_tensor(img, (16, 32), mode), image_to_tensor(img, (16, 32), mode=mode))


def test_sentencepiece_tokenizer_gives_training_ids(tmp_path):
    from ett_ds.hf.tokenization_ett import ETTSentencePieceTokenizer
    spm = train_spm(tmp_path / "spm")
    ours, tok = TextTokenizer(spm), ETTSentencePieceTokenizer(str(spm))
    ours.check_hf(tok, TOKEN_PROBES)  # ids, decoding, image specials and bos/eos/pad at training's ids
    assert len(tok) == ours.vocab_size
    assert tok("A cow.")["input_ids"] == [ours.bos_id] + ours.encode("A cow.")
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)
    assert (saved / "spm.model").read_bytes() == spm.read_bytes()

"""Inference on tiny trained checkpoints: generation, captioning, chat and every CLI error path."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ett_ds import infer
from ett_ds.checkpoint import CheckpointError
from ett_ds.engine import dist
from ett_ds.generation import ChatSession, _crop, caption, chat_reply, first_user_turn, generate_images
from ett_ds.models.loading import load_model
from tests.stage_batches import smooth_images, trained_checkpoint
from tests.tiny import train_spm

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    dist.init_distributed()
    spm = train_spm(tmp_path_factory.mktemp("spm"))
    root = tmp_path_factory.mktemp("runs")
    lr = ("optim.lr=3e-3", "optim.projector_lr=3e-3")
    _, t2i = trained_checkpoint(spm, root / "t2i", "t2i", 10, *lr)
    _, frozen = trained_checkpoint(spm, root / "frozen", "frozen", 1)
    _, tok = trained_checkpoint(spm, root / "tok", "tokenizer", 1)
    return {"t2i": t2i, "frozen": frozen, "tokenizer": tok}


@pytest.fixture(scope="module")
def t2i(ckpts):
    return load_model(ckpts["t2i"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    px = smooth_images(2, 40, 56, seed=5)
    paths = []
    for i, arr in enumerate(((px + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()):
        paths.append(str(d / f"img{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return {"ok": paths, "broken": str(d / "broken.png"), "dir": d}


def test_generate_cli_writes_valid_pngs_deterministically(ckpts, tmp_path):
    h, w = 16, 32  # tiny_config's data.image_size
    args = ["generate", "--ckpt", str(ckpts["t2i"]), "--prompt", "red fox", "--device", "cpu", "--top-k", "50"]
    assert infer.main(args + ["--out", str(tmp_path / "a.png"), "--seed", "1"]) == 0
    assert infer.main(args + ["--out", str(tmp_path / "b.png"), "--seed", "1"]) == 0
    assert infer.main(args + ["--out", str(tmp_path / "c.png"), "--seed", "2", "--num-images", "2"]) == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (w, h)
        a = np.asarray(im)
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b.png")))
    c0, c1 = (np.asarray(Image.open(tmp_path / f"c_{i}.png")) for i in range(2))
    assert not np.array_equal(c0, c1), "two samples of one prompt should differ"


def test_cfg_scale_one_equals_no_guidance(t2i):
    kw = dict(prompts=["red fox", "a cat"], seed=3, num_images=2, top_k=20)
    base = generate_images(t2i.model, t2i.text, cfg_scale=None, **kw)
    assert base.shape == (4, 3, 16, 32) and base.min() >= -1 and base.max() <= 1
    assert torch.equal(generate_images(t2i.model, t2i.text, cfg_scale=1.0, **kw), base)
    assert torch.equal(generate_images(t2i.model, t2i.text, cfg_scale=None, **kw), base)  # deterministic
    assert torch.equal(generate_images(t2i.model, t2i.text, cfg_scale=0.0, **kw), base)  # <= 0: guidance off
    greedy = dict(kw, temperature=0.0)
    assert not torch.equal(generate_images(t2i.model, t2i.text, cfg_scale=8.0, **greedy),
                           generate_images(t2i.model, t2i.text, cfg_scale=None, **greedy))


@torch.no_grad()
def test_kv_cache_decoding_equals_one_full_forward(t2i):
    """Greedy tokens and codes decoded with the cache are the argmax of a single teacher-forced forward."""
    from ett_ds.data.batch import Batcher
    from ett_ds.generation import decode_tokens, sample_codes
    m, text = t2i.model, t2i.text
    b = Batcher(t2i.cfg, text, train=False)
    px = smooth_images(2, 16, 32, seed=0)
    prompt = torch.tensor([b.caption_prompt()] * 2)
    toks = decode_tokens(m, text, prompt, px, max_new_tokens=6)
    q = m.tokenizer.encode(px)
    ids = torch.cat([prompt, toks], 1)
    hidden = m.llm_hidden(m.embed_inputs(ids, m.visual_tokens(q.z_q, q.indices)), torch.ones_like(ids))
    logits = m.llm.get_output_embeddings()(hidden[:, prompt.shape[1] - 1:-1]).float()
    logits[..., text.vocab_size:] = float("-inf")
    logits[..., [text.boi_id, text.eoi_id, text.image_id]] = float("-inf")
    before_eos = (toks == text.eos_id).long().cumsum(1) - (toks == text.eos_id).long() == 0
    assert torch.equal(logits.argmax(-1)[before_eos], toks[before_eos])

    cond = b.t2i_prompt("red fox")
    n = t2i.cfg.num_image_tokens
    codes = sample_codes(m, cond, None, n, 1, None, 0.0, 0, 1.0, None)
    embeds = torch.cat([m.llm.get_input_embeddings()(torch.tensor([cond])), m.embed_codes(codes[:, :-1])], 1)
    hidden = m.llm_hidden(embeds, torch.ones(embeds.shape[:2], dtype=torch.long))
    assert torch.equal(m.visual_head(hidden[:, len(cond) - 1:]).argmax(-1), codes)


def test_caption_greedy_is_deterministic_and_batch_equals_single(t2i):
    px = smooth_images(4, 16, 32, seed=0)  # the training images of the caption samples
    batch = caption(t2i.model, t2i.text, px, max_new_tokens=6)
    assert batch == caption(t2i.model, t2i.text, px, max_new_tokens=6)
    assert batch == [caption(t2i.model, t2i.text, px[i:i + 1], max_new_tokens=6)[0] for i in range(4)]
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    sampled = caption(t2i.model, t2i.text, px, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g())
    assert sampled == caption(t2i.model, t2i.text, px, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g())
    turns = [first_user_turn("what is it")]
    reply = chat_reply(t2i.model, t2i.text, px[0], turns, max_new_tokens=4)
    assert reply == chat_reply(t2i.model, t2i.text, px[:1], turns, max_new_tokens=4)


def test_chat_session_keeps_its_cache_and_replies_like_the_whole_conversation(t2i):
    """Turn after turn, the session's reply equals chat_reply over the full history, while the LLM runs only the
    new tokens: after the first turn, far fewer prompt tokens than the conversation (image tokens included)."""
    px = smooth_images(1, 16, 32, seed=3)
    session = ChatSession(t2i.model, t2i.text, px[0])
    turns = []
    for message in ("what is it", "and the colour", "say it again"):
        turns.append(first_user_turn(message) if not turns else {"from": "human", "value": message})
        expect = chat_reply(t2i.model, t2i.text, px[0], turns, max_new_tokens=5)
        before = session.prefilled
        assert session.reply(message, max_new_tokens=5) == expect
        turns.append({"from": "gpt", "value": expect})
        new = session.prefilled - before
        if len(turns) > 2:
            full = len(session.cached) - 5  # the conversation's prompt, at least
            assert new < full - t2i.cfg.num_image_tokens, (new, full)
    assert session.turns == turns
    cache = session.stream.cache
    assert cache.get_seq_length() == len(session.cached)
    assert _crop(cache, len(session.cached) - 3) and cache.get_seq_length() == len(session.cached) - 3


def test_caption_chat_reconstruct_cli(ckpts, images, capsys, monkeypatch, tmp_path):
    assert infer.main(["caption", "--ckpt", str(ckpts["t2i"].parents[1]), "--image", *images["ok"],
                       "--max-new-tokens", "4"]) == 0  # a run folder: its newest step
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(images["ok"])  # FILE<TAB>caption, one per image
    assert all(line.count("\t") == 1 for line in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nwhat colour\n"))
    assert infer.main(["chat", "--ckpt", str(ckpts["t2i"]), "--image", images["ok"][0],
                       "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    out = tmp_path / "sub" / "r.png"
    assert infer.main(["reconstruct", "--ckpt", str(ckpts["tokenizer"]), "--image", images["ok"][0],
                       "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 16)


def error_cases(ckpts, images, tmp_path):
    t2i, img = str(ckpts["t2i"]), images["ok"][0]
    (tmp_path / "file").write_text("x")
    return {
        "missing ckpt": ["caption", "--ckpt", str(tmp_path / "nope"), "--image", img],
        "not a checkpoint": ["caption", "--ckpt", str(images["dir"]), "--image", img],
        "missing image": ["caption", "--ckpt", t2i, "--image", str(tmp_path / "nope.png")],
        "unreadable image": ["caption", "--ckpt", t2i, "--image", images["broken"]],
        "chat unreadable image": ["chat", "--ckpt", t2i, "--image", images["broken"]],
        "reconstruct missing image": ["reconstruct", "--ckpt", t2i, "--image", "nope.png", "--out", "x.png"],
        "generate without visual head": ["generate", "--ckpt", str(ckpts["frozen"]), "--prompt", "a",
                                         "--out", str(tmp_path / "g.png")],
        "caption without LLM": ["caption", "--ckpt", str(ckpts["tokenizer"]), "--image", img],
        "out not png": ["generate", "--ckpt", t2i, "--prompt", "a", "--out", str(tmp_path / "g.jpg")],
        "out under a file": ["generate", "--ckpt", t2i, "--prompt", "a", "--out", str(tmp_path / "file" / "g.png")],
    }


def test_every_cli_error_is_one_line_and_exit_2(ckpts, images, capsys, tmp_path):
    for name, argv in error_cases(ckpts, images, tmp_path).items():
        assert infer.main(argv) == 2, name
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, cap.err)
        assert cap.out == "" or name == "out under a file", (name, cap.out)
    capsys.readouterr()
    assert "needs a t2i checkpoint" in _err(["generate", "--ckpt", str(ckpts["frozen"]), "--prompt", "a",
                                             "--out", str(tmp_path / "g.png")], capsys)
    with pytest.raises(CheckpointError, match="stage=tokenizer"):
        load_model(ckpts["tokenizer"], require="llm")


def _err(argv, capsys):
    infer.main(argv)
    return capsys.readouterr().err


def test_cli_as_a_process(ckpts, images):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "ett_ds.infer", "caption", "--ckpt", str(ckpts["t2i"]), "--image",
                        images["broken"]], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: cannot read image")


def test_caption_lines_are_one_tsv_row_per_image_whatever_the_caption_holds():
    """issue 22: `infer caption` names each image; a caption with a tab or newline stays on its file's line."""
    for text in ("a cow", "", "tab\there", "two\nlines", "back\\slash\\t"):
        field = infer.caption_field(text)
        assert "\t" not in field and "\n" not in field
        assert field.encode().decode("unicode_escape") == text  # the escapes are the standard ones

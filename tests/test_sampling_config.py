"""Issue 24: the sampling settings live in the config tree (``sampling.*``); a checkpoint's values are the defaults of
``ett_ds.infer`` and ``ett_ds.evaluate``, and a flag overrides them. The model is faked: only the settings that reach
the generation calls are checked (fast, no training)."""
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ett_ds import evaluate, infer
from ett_ds.config import load_config

SAMPLING = {"cfg_scale": 2.5, "t2i_temperature": 0.7, "t2i_top_k": 5, "t2i_top_p": 0.9, "temperature": 0.3,
            "top_k": 4, "top_p": 0.8, "caption_max_new_tokens": 7, "chat_max_new_tokens": 9}


@pytest.fixture
def cfg():
    return load_config("tiny", [f"sampling.{k}={v}" for k, v in SAMPLING.items()])


@pytest.fixture
def calls(cfg, monkeypatch):
    """infer with a fake checkpoint whose config is ``cfg``: the keywords each generation call got."""
    seen = {}

    def generate_images(model, text, prompts, **kw):
        seen["generate"] = kw
        return torch.zeros(len(prompts) * kw["num_images"], 3, *cfg.data.image_size)

    def caption(model, text, pixels, **kw):
        seen["caption"] = kw
        return ["a caption"] * len(pixels)

    monkeypatch.setattr(infer, "resolve", lambda path: ("step", Path(path)))
    monkeypatch.setattr(infer, "read_config", lambda kind, folder: cfg)
    monkeypatch.setattr(infer, "load_model", lambda *a, **k: SimpleNamespace(model=None, text=None, cfg=cfg))
    monkeypatch.setattr(infer, "generate_images", generate_images)
    monkeypatch.setattr(infer, "caption", caption)
    return seen


def test_the_config_tree_declares_the_sampling_settings():
    with pytest.raises(ValueError, match="sampling.top_p"):
        load_config("tiny", ["sampling.top_p=0"])
    assert load_config("tiny").sampling.t2i() == {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert load_config("tiny", ["sampling.cfg_scale=0"]).sampling.t2i()["cfg_scale"] == 0  # generate: guidance off
    s = load_config("tiny").sampling
    assert s.with_overrides(cfg_scale=None, top_k=7) == dataclasses.replace(s, top_k=7)  # None: not given


def test_infer_generate_takes_the_checkpoints_sampling_unless_a_flag_sets_it(calls, tmp_path):
    argv = ["generate", "--ckpt", str(tmp_path), "--prompt", "a", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    assert infer.main(argv) == 0
    assert {k: calls["generate"][k] for k in ("cfg_scale", "temperature", "top_k", "top_p")} == {
        "cfg_scale": 2.5, "temperature": 0.7, "top_k": 5, "top_p": 0.9}
    assert infer.main(argv + ["--cfg-scale", "4", "--temperature", "0", "--top-k", "9", "--top-p", "0.5"]) == 0
    assert {k: calls["generate"][k] for k in ("cfg_scale", "temperature", "top_k", "top_p")} == {
        "cfg_scale": 4.0, "temperature": 0.0, "top_k": 9, "top_p": 0.5}
    assert infer.main(argv + ["--cfg-scale", "0"]) == 0 and calls["generate"]["cfg_scale"] == 0  # off (test_infer)


def test_infer_caption_takes_the_checkpoints_sampling_unless_a_flag_sets_it(calls, cfg, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", tuple(reversed(cfg.data.image_size))).save(image)
    argv = ["caption", "--ckpt", str(tmp_path), "--image", str(image), "--device", "cpu"]
    assert infer.main(argv) == 0
    got = {k: calls["caption"][k] for k in ("max_new_tokens", "temperature", "top_k", "top_p")}
    assert got == {"max_new_tokens": 7, "temperature": 0.3, "top_k": 4, "top_p": 0.8}
    assert infer.main(argv + ["--max-new-tokens", "3", "--temperature", "0", "--top-k", "0", "--top-p", "1"]) == 0
    got = {k: calls["caption"][k] for k in ("max_new_tokens", "temperature", "top_k", "top_p")}
    assert got == {"max_new_tokens": 3, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    assert capsys.readouterr().out.splitlines() == [f"{image}\ta caption"] * 2


def test_evaluate_t2i_takes_the_checkpoints_sampling_unless_a_flag_sets_it(cfg):
    loaded = SimpleNamespace(model=None, text=None, cfg=cfg)

    def t2i(*flags):
        args = evaluate.parse_args(["--ckpt", "x", "--out", "m.json", "--tasks", "t2i", "--seed", "3", *flags])
        (task,) = evaluate.build_tasks(["t2i"], loaded, None, args, "data", 0, 1)
        return task.sampling

    assert t2i() == {"cfg_scale": 2.5, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3}
    assert t2i("--cfg-scale", "1.5", "--t2i-temperature", "0", "--t2i-top-k", "2", "--t2i-top-p", "0.5") == {
        "cfg_scale": 1.5, "temperature": 0.0, "top_k": 2, "top_p": 0.5, "seed": 3}
    assert t2i("--cfg-scale", "0")["cfg_scale"] == 0  # generate_images: guidance off


def test_help_names_the_checkpoint_config_as_the_default(capsys):
    for argv in (["generate", "--help"], ["caption", "--help"]):
        with pytest.raises(SystemExit):
            infer.parse_args(argv)
    out = " ".join(capsys.readouterr().out.split())
    for key in ("cfg_scale", "t2i_temperature", "t2i_top_k", "t2i_top_p", "temperature", "top_k", "top_p",
                "caption_max_new_tokens"):
        assert f"(default: the checkpoint's sampling.{key})" in out, key

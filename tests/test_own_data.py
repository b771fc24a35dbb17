"""Issue 22 item 3: training on one's own captions without reading source (the `own` recipe, docs/own_data.md).

The recipe names what it needs in one line; a random-init LLM without a text tokenizer gets a sentencepiece model
trained from the shards' captions, recorded in the run's config and handed down the stage chain; `model.llm.path`
drops `init_config`; `ett_ds.config --help` and `ett_ds.train --help` say where the keys are.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ett_ds.config import ConfigError, config_from_dict, load_config, to_dict
from tests.tiny import run_group, subprocess_env

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (50, 80, 220)}
SHAPES = ("circle", "square")


def own_images(folder: Path, n: int, seed: int) -> Path:
    """A folder of x.jpg + x.txt (the caption), as a user has it: coloured shapes on a light background."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = Image.new("RGB", (48, 40), (235, 235, 225))
        s, x, y = rng.randint(12, 24), rng.randint(2, 20), rng.randint(2, 14)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + s, y + s), fill=COLOURS[colour])
        img.save(folder / f"img{i:04d}.jpg", quality=90)
        (folder / f"img{i:04d}.txt").write_text(f"a {colour} {shape}\n")
    return folder


def shard(src: Path, out: Path) -> Path:
    from data_tools.cli import main as data_tools
    assert data_tools(["shard", str(src), "--out", str(out), "--samples-per-shard", "20", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("own")
    return {"train": shard(own_images(root / "images" / "train", 48, 1), root / "shards" / "train"),
            "heldout": shard(own_images(root / "images" / "heldout", 8, 2), root / "shards" / "heldout"),
            "images": root / "images", "root": root}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------- the recipe's needs
def test_own_recipe_names_the_keys_it_needs_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_config("own")
    msg = str(e.value)
    assert msg.startswith("recipe own needs: data.train=SHARDS (") and "data_tools shard" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="^recipe own needs: data.train="):
        load_config("own", ["data.train="])  # empty is unset
    cfg = load_config("own", ["data.train=/data/shards"])
    assert cfg.data.train == "/data/shards" and cfg.data.demo_dir is None and cfg.model.llm.text_tokenizer is None
    assert "needs" not in to_dict(cfg)  # recipe metadata, not a config key: the saved config.yaml loads back
    assert config_from_dict(to_dict(cfg)).data.train == "/data/shards"


@pytest.mark.slow  # five interpreters (about 18 s on 2 shared cores)
def test_cli_missing_key_is_one_line_exit_2_and_help_points_to_the_key_reference():
    r = _cli("-m", "ett_ds.train", "--config", "own")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: recipe own needs: data.train=SHARDS"), r.stderr
    r = _cli("-m", "ett_ds.train", "--help")
    assert r.returncode == 0 and "docs/configuration.md" in r.stdout and "docs/own_data.md" in r.stdout
    r = _cli("-m", "ett_ds.config", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m ett_ds.config") and r.stderr == ""
    assert "--markdown" in r.stdout and "configuration" in r.stdout.lower()  # where the key reference is
    r = _cli("-m", "ett_ds.config", "own")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "recipe own needs: data.train=" in r.stderr
    r = _cli("-m", "ett_ds.config", "own", "data.train=/x")
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["data"]["train"] == "/x"


def test_llm_path_drops_init_config_from_the_run_and_its_saved_config():
    cfg = load_config("tiny", ["model.llm.path=/models/qwen"])  # the recipe has an init_config
    assert cfg.model.llm.path == "/models/qwen" and cfg.model.llm.init_config is None
    saved = to_dict(cfg)
    assert saved["model"]["llm"]["init_config"] is None
    assert config_from_dict(saved).model.llm.init_config is None
    assert load_config("tiny").model.llm.init_config["model_type"] == "qwen2"  # without path: kept


# ---------------------------------------------------------------------------------------- the text tokenizer
def test_spm_trained_from_the_shards_captions(shards, tmp_path):
    import sentencepiece as spm

    from data_tools.spm import captions_from_shards, spm_from_shards
    caps = captions_from_shards(str(shards["train"]))
    assert len(caps) == 48 and set(caps) <= {f"a {c} {s}" for c in COLOURS for s in SHAPES}
    assert len(captions_from_shards(f"{shards['train']}::{shards['heldout']}", max_sentences=50)) == 50  # bounded
    made = spm_from_shards(str(shards["train"]), str(tmp_path / "own"), vocab_size=50)  # raised to the minimum
    sp = spm.SentencePieceProcessor(model_file=made["model"])
    assert made["sentences"] == 48 and sp.get_piece_size() == made["vocab_size"] >= 256
    assert sp.decode(sp.encode("a blue circle")) == "a blue circle" and sp.eos_id() == 3


def test_spm_corpus_takes_the_turns_of_sft_shards(shards, tmp_path):
    import io
    import tarfile

    from data_tools.spm import captions_from_shards
    jpg = next((shards["images"] / "train").glob("*.jpg")).read_bytes()
    conv = {"conversations": [{"from": "human", "value": "<image>\nWhat shape is it?"},
                              {"from": "gpt", "value": "A red circle."}], "task": "sft"}
    with tarfile.open(tmp_path / "sft-000000.tar", "w") as tar:
        for name, data in (("s0.jpg", jpg), ("s0.json", json.dumps(conv).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert captions_from_shards(str(tmp_path)) == ["What shape is it?", "A red circle."]


def test_the_run_trains_inherits_and_records_its_text_tokenizer(shards, tmp_path):
    from ett_ds.preflight import ensure_text_tokenizer
    base = [f"data.train={shards['train']}", f"out_dir={tmp_path}"]
    cfg = load_config("own", base + ["name=a", "stage=align"])
    ensure_text_tokenizer(cfg)
    assert cfg.model.llm.text_tokenizer == str(tmp_path / "a" / "spm.model") and Path(cfg.model.llm.text_tokenizer).is_file()
    # a later stage started from that run's checkpoint takes the same model over (its config.yaml records it)
    step = tmp_path / "a" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    nxt = load_config("own", base + ["name=b", "stage=ett", f"train.init_from={step}"])
    ensure_text_tokenizer(nxt)
    assert Path(nxt.model.llm.text_tokenizer).read_bytes() == (tmp_path / "a" / "spm.model").read_bytes()
    tok = load_config("own", base + ["name=c", "stage=tokenizer"])
    ensure_text_tokenizer(tok)  # no LLM: nothing to make
    assert tok.model.llm.text_tokenizer is None and not (tmp_path / "c").exists()


def test_a_missing_text_tokenizer_says_where_tokenizers_come_from(shards, tmp_path, monkeypatch):
    from ett_ds.data.text import TextTokenizer
    from ett_ds.preflight import ensure_text_tokenizer
    monkeypatch.chdir(tmp_path)  # the recipe's relative data/demo/spm.model: absent here even where a demo was built
    cfg = load_config("tiny", [f"data.train={shards['train']}"])  # the demo recipe on one's own shards
    with pytest.raises(FileNotFoundError) as e:
        ensure_text_tokenizer(cfg)
    msg = str(e.value)
    assert "data/demo/spm.model" in msg and "--config own" in msg and "docs/own_data.md" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="model.llm.text_tokenizer: .*docs/own_data.md"):
        TextTokenizer("/nowhere/spm.model")


# ------------------------------------------------------------------------------------ every stage, end to end
SMALL = ["data.image_size=[32,32]", "model.llm.init_config.num_hidden_layers=2", "model.llm.init_config.hidden_size=64",
         "model.llm.init_config.intermediate_size=128", "train.micro_batch_size=4", "data.num_workers=0",
         "data.shuffle_buffer=20", "engine.persistence_threshold=0", "train.log_every=1", "train.image_every=0"]


@pytest.mark.slow
def test_walkthrough_stages_on_an_own_data_folder(shards, tmp_path):
    """tokenizer -> align -> ett -> sft, two steps each, only `own` + data.train + init_from; then evaluate, export,
    infer caption on the export (the commands of docs/own_data.md)."""
    runs = tmp_path / "runs"

    def train(name: str, stage: str, *extra: str) -> Path:
        cmd = [sys.executable, "-m", "ett_ds.train", "--config", "own", f"data.train={shards['train']}",
               f"data.eval={shards['heldout']}", f"out_dir={runs}", f"name={name}", f"stage={stage}",
               "train.max_steps=2", *SMALL, *extra]
        rc, out, err = run_group(cmd, timeout=600, cwd=REPO, env=subprocess_env())
        assert rc == 0, err[-3000:]
        return runs / name / "checkpoints" / "step_00000002"

    tok = train("tok", "tokenizer")
    align = train("align", "align", f"train.init_from={tok}")
    assert (runs / "align" / "spm.model").is_file() and not (runs / "tok" / "spm.model").exists()
    recorded = yaml.safe_load((align / "config.yaml").read_text())["model"]["llm"]["text_tokenizer"]
    assert recorded == str(runs / "align" / "spm.model")
    ett = train("ett", "ett", f"train.init_from={align}", "train.eval_every=2", "train.eval_samples=4",
                "train.eval_images=2")
    assert (runs / "ett" / "spm.model").read_bytes() == (runs / "align" / "spm.model").read_bytes()
    train("sft", "sft", f"train.init_from={ett}")

    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "ett_ds.evaluate", "--ckpt", str(runs / "ett"), "--data",
                        str(shards["heldout"]), "--tasks", "recon,caption", "--out", str(tmp_path / "m.json"),
                        "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "caption" in metrics and "psnr" in json.dumps(metrics)
    r = subprocess.run([sys.executable, "-m", "ett_ds.export", "--ckpt", str(runs / "ett"), "--out",
                        str(tmp_path / "exported")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "exported" / "spm.model").read_bytes() == (runs / "align" / "spm.model").read_bytes()
    image = sorted((shards["images"] / "heldout").glob("*.jpg"))[0]
    r = subprocess.run([sys.executable, "-m", "ett_ds.infer", "caption", "--ckpt", str(tmp_path / "exported"),
                        "--image", str(image), "--max-new-tokens", "4"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

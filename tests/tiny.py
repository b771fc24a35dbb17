"""Shared builders for tests: a sentencepiece model trained on the spot, tiny configs and hand-made batches."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ett_ds.config import load_config

WORDS = ("the quick brown fox jumps over a lazy dog read text image token model train stage code book "
         "red green blue cat sun moon star tree river stone").split()


def train_spm(folder: Path) -> Path:
    import sentencepiece as spm
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 5)) for i in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "spm"), vocab_size=300,
                                   model_type="unigram", character_coverage=1.0, byte_fallback=True, pad_id=0,
                                   unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2)
    return folder / "spm.model"


# The tiny recipe shrunk further for tests; ZeRO-3 really partitions (persistence threshold 0).
SHRINK = ["data.demo_dir=null", "engine.persistence_threshold=0", "model.llm.init_config.num_hidden_layers=2",
          "model.llm.init_config.hidden_size=64", "model.llm.init_config.intermediate_size=128",
          "data.image_size=[16,32]", "model.tokenizer.attn_resolutions=[4]", "train.micro_batch_size=4"]


def tiny_config(spm_model: Path, out_dir: Path, *overrides: str):
    """A Config for in-process Trainers fed with hand-made batches."""
    base = [f"model.llm.text_tokenizer={spm_model}", f"out_dir={out_dir}", *SHRINK,
            "train.log_every=1", "train.save_every=1000", "train.image_every=0", "optim.warmup_ratio=0"]
    return load_config("tiny", base + list(overrides))


def build_demo(out: Path, num_train: int, num_heldout: int, per_shard: int) -> Path:
    """`python -m data_tools demo` at the tests' 16x32 size."""
    from data_tools.cli import main as data_tools
    assert data_tools(["demo", "--out", str(out), "--num-train", str(num_train), "--num-heldout", str(num_heldout),
                       "--size", "16x32", "--samples-per-shard", str(per_shard), "--no-progress"]) == 0
    return out


def demo_train_args(demo: Path, out: Path, *extra: str) -> list[str]:
    """`python -m ett_ds.train` arguments for the tiny recipe on demo shards built by `build_demo`."""
    return ["--config", "tiny", f"out_dir={out}", f"data.train={demo}/train", f"data.eval={demo}/heldout",
            f"model.llm.text_tokenizer={demo}/spm.model", *SHRINK, "data.num_workers=0", "data.shuffle_buffer=20",
            *extra]


def caption_batch(trainer, captions: list[str], seed: int = 0) -> dict:
    """A batch built by the real Batcher from random images and the given captions."""
    from ett_ds.data.batch import Batcher
    g = torch.Generator().manual_seed(seed)
    b = Batcher(trainer.cfg, trainer.text, train=False)
    h, w = trainer.cfg.data.image_size
    examples = []
    for c in captions:
        ids, labels = b.caption_sequence(c)
        examples.append({"pixels": torch.rand(3, h, w, generator=g) * 2 - 1, "text": c, "gen": False,
                         "input_ids": ids, "labels": labels})
    return b.collate(examples)


def repeat(batch: dict):
    while True:
        yield dict(batch)


TORCH_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict:
    """The test environment minus conftest's in-process rank variables (a launcher sets its own), plus extras."""
    import os
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in TORCH_DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_group(cmd: list[str], timeout: float, cwd=None, env: dict | None = None) -> tuple[int, str, str]:
    """Run a (multi-process) command in its own session; on timeout kill the whole group and fail the test."""
    import os
    import signal
    import subprocess

    import pytest
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish in {timeout} s; output tail:\n{(out + err)[-3000:]}")
    return proc.returncode, out, err


# -- LLaVA-format rows (tests of data_tools llava) ------------------------------------------------------------------
def text_png(text: str) -> bytes:
    """A 64x32 PNG with ``text`` drawn in PIL's default font."""
    img = Image.new("RGB", (64, 32), (235, 230, 220))
    ImageDraw.Draw(img).text((4, 10), text, fill=(20, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def turn(who: str, text: str) -> dict:
    """One LLaVA conversation turn."""
    return {"from": who, "value": text}

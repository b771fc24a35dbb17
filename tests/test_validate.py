"""Held-out validation during training (train.eval_every): metrics.jsonl eval rows, TensorBoard panels, grids with
captions under the images; absent loss terms are null; init_from names the tensors it did not use."""
import json
import math

import pytest
import torch

from ett_ds.train import main
from tests.tiny import build_demo, demo_train_args

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

EVAL = ["train.eval_samples=6", "train.eval_images=3"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 60, 12, 30)


def run(demo, out, name, stage, steps, *extra):
    assert main(demo_train_args(demo, out, f"name={name}", f"stage={stage}", f"train.max_steps={steps}",
                                "train.log_every=1", "loss.gan_start_step=1", *extra)) == 0
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def tb_tags(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


def check_captions(ev: dict, n: int) -> None:
    cap = ev["caption"]
    assert 0.0 <= cap["exact_match"] <= 1.0 and finite(cap["cer"]) and cap["cer"] >= 0
    assert cap["num"] == n and len(cap["samples"]) == n
    assert all(isinstance(s["pred"], str) and s["true"] for s in cap["samples"])


def test_ett_validates_every_n_steps_without_changing_training(demo, tmp_path):
    train, evals = run(demo, tmp_path, "ev", "ett", 4, "train.eval_every=2", *EVAL)
    assert [r["step"] for r in evals] == [2, 4]
    for ev in (r["eval"] for r in evals):
        for key in ("loss", "loss_cap", "loss_vq", "l1", "quant", "psnr", "codebook_usage", "seconds"):
            assert finite(ev[key]), key
        assert ev["num_samples"] == 6
        check_captions(ev, 3)
    # the same held-out images each time: the references repeat
    assert [s["true"] for s in evals[0]["eval"]["caption"]["samples"]] == \
           [s["true"] for s in evals[1]["eval"]["caption"]["samples"]]
    run_dir = tmp_path / "ev"
    for name in ("eval_recon_step00000002.png", "eval_captions_step00000004.png"):
        assert (run_dir / "images" / name).is_file(), name
    tags = tb_tags(run_dir)
    assert {"eval/loss", "eval/psnr", "eval/caption/exact_match", "eval/caption/cer"} <= set(tags["scalars"])
    assert {"eval/recon", "eval/captions"} <= set(tags["images"])
    assert any(t.startswith("eval/captions") for t in tags["tensors"])  # the text panel
    # validation restores the RNG states and the model's modes: the training rows equal those of a run without it
    plain, none = run(demo, tmp_path, "plain", "ett", 4)
    assert none == []
    assert [r["step"] for r in train] == [r["step"] for r in plain] == [1, 2, 3, 4]
    for a, b in zip(train, plain):
        for key in ("loss", "loss_cap", "loss_vq", "loss_d"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_t2i_and_align_validate_and_init_from_names_unused_tensors(demo, tmp_path, capsys):
    train, evals = run(demo, tmp_path, "gen", "t2i", 2, "train.eval_every=2", "train.image_every=2", *EVAL)
    assert all(r["loss_cap"] is None and finite(r["loss_t2i"]) for r in train), "t2i has no caption positions"
    (ev,) = [r["eval"] for r in evals]
    assert ev["loss_cap"] is None and finite(ev["loss_t2i"]) and finite(ev["loss"])
    assert "psnr" not in ev and "caption" not in ev and ev["t2i"]["num"] == 3
    images = tmp_path / "gen" / "images"
    assert (images / "eval_t2i_step00000002.png").is_file() and (images / "samples_step00000002.png").is_file()
    assert "eval/t2i" in tb_tags(tmp_path / "gen")["images"]

    capsys.readouterr()
    ckpt = tmp_path / "gen" / "checkpoints" / "step_00000002"
    _, evals = run(demo, tmp_path, "al", "align", 1, "train.eval_every=1", f"train.init_from={ckpt}", *EVAL)
    line = next(x for x in capsys.readouterr().out.splitlines() if "init_from" in x)
    assert "1 unused (visual_head.weight)" in line, line  # not the tied lm_head alias
    (ev,) = [r["eval"] for r in evals]
    assert finite(ev["loss_cap"]) and "psnr" not in ev
    check_captions(ev, 3)
    assert (tmp_path / "al" / "images" / "eval_captions_step00000001.png").is_file()


def test_grid_writes_captions_under_the_images(tmp_path):
    import numpy as np
    from PIL import Image

    from ett_ds.eval.metrics import save_grid
    a = torch.zeros(2, 3, 16, 40)  # mid grey
    plain = save_grid([a], tmp_path / "p.png", pad=2)
    capt = save_grid([a, a], tmp_path / "c.png", pad=2, captions=[["pred: 12\ntrue: 12", "x " * 30], None])
    with Image.open(plain) as p, Image.open(capt) as c:
        (w0, h0), (w1, h1) = p.size, c.size
        band = np.asarray(c.convert("L"))[2 + 16:, 2:42]  # under the first image of the captioned row
    assert w1 == w0 and h1 > 2 * h0  # the second row adds one cell; the captions add a band of text lines
    assert (band < 128).any(), "no text drawn under the image"
    with pytest.raises(ValueError):
        save_grid([a], tmp_path / "bad.png", captions=[["1", "2", "3"]])


def test_absent_loss_term_is_null_and_present_ones_average_over_their_batches(tmp_path):
    from ett_ds.runlog import RunLog
    log = RunLog(tmp_path, every=1, enabled=False)
    idx = torch.zeros(4, dtype=torch.long)
    t = torch.tensor
    log.add({"loss": t(2.0), "loss_cap": t(0.0)}, idx, 8, samples=4, present={"loss_cap": t(False)})
    row = log.step(1, {"llm": 1.0})
    assert row["loss_cap"] is None and row["loss"] == 2.0
    log.add({"loss": t(2.0), "loss_cap": t(float("nan"))}, idx, 8, samples=4, present={"loss_cap": t(False)})
    log.add({"loss": t(4.0), "loss_cap": t(3.0)}, idx, 8, samples=4, present={"loss_cap": t(True)})
    row = log.step(2, {"llm": 1.0})
    assert row["loss_cap"] == 3.0 and row["loss"] == 3.0


def test_two_ranks_validate_together(demo, tmp_path):
    """ZeRO-3 over 2 processes: every rank runs the held-out forwards and the greedy captions (no hang), the loss
    samples are split evenly (7 held-out samples -> 3 per rank), rank 0 writes one row per pass."""
    import sys
    from pathlib import Path

    from tests.tiny import run_group, subprocess_env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ett_ds.train", *demo_train_args(demo, tmp_path, "name=two", "stage=ett", "train.max_steps=2",
                                            "train.eval_every=2", "train.eval_samples=7", "train.eval_images=2")]
    rc, out, err = run_group(cmd, 300, cwd=Path(__file__).resolve().parents[1], env=subprocess_env())
    assert rc == 0, (out + err)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r["eval"] for r in rows if "eval" in r]
    assert ev["num_samples"] == 6 and finite(ev["loss_cap"]) and finite(ev["psnr"])
    check_captions(ev, 2)

"""A diverging run: a non-finite loss or gradient norm never reaches the weights, checkpoints are written only from
finite weights, keep_last never deletes the newest checkpoint known to be good, and max_bad_steps stops the run.

All through the real ZeRO-3 engine on CPU (stage=ett: tokenizer + projector + LLM + discriminator).
"""
import itertools
import math

import pytest
import torch

from ett_ds import checkpoint as ckpt
from ett_ds.engine import dist
from ett_ds.models.weights import full_state_dict
from ett_ds.trainer import Trainer, TrainingDiverged, finite_gate
from tests.tiny import caption_batch, tiny_config, train_spm

CAPTIONS = ["red fox", "blue sun", "a cat", "tree"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    dist.init_distributed()
    return train_spm(tmp_path_factory.mktemp("spm"))


def poisoned(batch):
    """The same batch with one NaN pixel: every loss term of the step becomes NaN."""
    out = dict(batch)
    out["pixels"] = batch["pixels"].clone()
    out["pixels"][0, 0, 0, 0] = float("nan")
    return out


def state(tr):
    """Everything a step may change: full weights, fp32 masters, discriminator, its optimizer, LeCAM anchors."""
    masters = [t.clone() for t in tr.engine.optimizer.fp32_partitioned_groups_flat]
    disc = {k: v.clone() for k, v in tr.objective.gan.state_dict().items()}
    return full_state_dict(tr.model), masters, disc


def test_finite_gate_is_one_or_nan():
    one, nan, inf = torch.tensor(2.5), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert finite_gate(one).item() == 1.0 and finite_gate(one, None).item() == 1.0
    assert math.isnan(finite_gate(nan).item()) and math.isnan(finite_gate(one, -inf).item())


def test_a_nan_step_is_skipped_on_every_part_and_training_goes_on(spm_model, tmp_path):
    tr = Trainer(tiny_config(spm_model, tmp_path, "stage=ett", "engine.precision=fp32", "loss.gan_start_step=0"))
    good = caption_batch(tr, CAPTIONS)
    assert tr.train_step(iter([good])) is True
    before = state(tr)
    assert tr.train_step(iter([poisoned(good)])) is False
    after = state(tr)
    assert (tr.bad_in_row, tr.bad_total) == (1, 1)
    for name, t in before[0].items():
        assert torch.equal(t, after[0][name]), f"{name} changed in a skipped step"
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1])), "fp32 master weights changed"
    for name, t in before[2].items():
        assert torch.equal(t, after[2][name]), f"discriminator state {name} changed in a skipped step"
    assert tr.train_step(iter([good])) is True  # the next finite step applies, the count restarts
    assert tr.bad_in_row == 0 and tr.bad_total == 1
    assert all(torch.isfinite(v).all() for v in state(tr)[0].values())


def test_prune_keeps_newest_known_good_checkpoint(tmp_path):
    dirs = []
    for step in (1, 2, 3, 4):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / ckpt.MARKER).write_text("ok\n")
        dirs.append(d)
    (dirs[0] / ckpt.GOOD).write_text("ok\n")
    assert ckpt.to_prune(dirs, keep_last=1) == dirs[1:3]  # step 1: newest good; step 4: newest
    (dirs[2] / ckpt.GOOD).write_text("ok\n")
    assert ckpt.to_prune(dirs, keep_last=1) == dirs[:2]
    assert ckpt.to_prune(dirs, keep_last=0) == []


@pytest.mark.slow
def test_diverging_run_keeps_its_last_good_checkpoint_and_stops_after_max_bad_steps(spm_model, tmp_path):
    """Steps 1-3 finite (saved every step, keep_last=1), then every batch gives NaN: no checkpoint is written after
    the first bad step, step 2's checkpoint (followed by the finite step 3) survives, and the run stops with a
    one-line error after 3 bad steps in a row."""
    import tarfile
    shard = tmp_path / "unused-000000.tar"  # fit() checks that data.train exists; the batches below replace it
    tarfile.open(shard, "w").close()
    tr = Trainer(tiny_config(spm_model, tmp_path, "stage=ett", "engine.precision=fp32", "train.save_every=1",
                             "train.keep_last=1", "train.max_bad_steps=3", "train.max_steps=20",
                             "train.log_every=5", f"data.train={shard}"))
    good = caption_batch(tr, CAPTIONS)
    tr.batches = lambda: itertools.chain(iter([good] * (3 - tr.step)) if tr.step < 3 else iter([]),
                                         itertools.repeat(poisoned(good)))
    with pytest.raises(TrainingDiverged) as e:
        tr.fit()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "max_bad_steps=3" in msg and "step_00000002" in msg, msg
    assert tr.step == 6 and tr.bad_total == 3
    root = tr.ckpt_root
    assert [d.name for d in ckpt.step_dirs(root)] == ["step_00000002", "step_00000003"]
    assert ckpt.newest_good(root).name == "step_00000002"
    from ett_ds.models.weights import consolidated_state_dict
    for d in ckpt.step_dirs(root):
        assert all(torch.isfinite(v).all() for v in consolidated_state_dict(d).values() if v.is_floating_point())


def test_a_checkpoint_is_never_written_from_non_finite_weights(spm_model, tmp_path):
    tr = Trainer(tiny_config(spm_model, tmp_path, "stage=ett", "engine.precision=fp32"))
    tr.train_step(iter([caption_batch(tr, CAPTIONS)]))
    shard = tr.engine.optimizer.fp32_partitioned_groups_flat[0]
    with torch.no_grad():
        shard[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weights are not finite"):
        tr.save()
    assert ckpt.step_dirs(tr.ckpt_root) == []

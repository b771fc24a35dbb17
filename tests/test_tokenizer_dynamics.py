"""train.log_tokenizer_dynamics: code drift and the caption / L_vq gradient ratio at z_q, on a real ZeRO-3 Trainer."""
import pytest

from ett_ds.engine import dist
from tests.stage_batches import CAPTIONS
from tests.tiny import caption_batch, repeat, tiny_config, train_spm


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    dist.init_distributed()
    return train_spm(tmp_path_factory.mktemp("spm"))


def one_step(spm, tmp_path, *overrides):
    from ett_ds.trainer import Trainer
    tr = Trainer(tiny_config(spm, tmp_path, "stage=ett", "engine.precision=fp32", "train.log_tokenizer_dynamics=true",
                             *overrides))
    tr.train_step(repeat(caption_batch(tr, CAPTIONS)))
    return {k: float(tr.log.sums[k]) for k in ("code_drift", "grad_ratio", "loss_cap")}


@pytest.mark.slow
def test_grad_ratio_scales_with_one_over_alpha_and_drift_follows_the_tokenizer_lr(spm, tmp_path):
    """At the first step (same init, same batch) the decoder branch's gradient is alpha dL_vq/dz_q and the caption
    branch's does not depend on alpha: doubling alpha halves the ratio. A tokenizer lr of 0 leaves the codebook
    rows where they were (drift exactly 0); a positive one moves them."""
    a = one_step(spm, tmp_path / "a", "loss.alpha=0.25")
    b = one_step(spm, tmp_path / "b", "loss.alpha=0.5")
    assert a["loss_cap"] == pytest.approx(b["loss_cap"], rel=1e-6)
    assert a["grad_ratio"] > 0 and b["grad_ratio"] == pytest.approx(a["grad_ratio"] / 2, rel=1e-3)
    assert a["code_drift"] > 0
    still = one_step(spm, tmp_path / "c", "optim.tokenizer_lr=0", "optim.warmup_ratio=0")
    assert still["code_drift"] == 0.0


def test_dynamics_do_not_change_the_losses(spm, tmp_path):
    from ett_ds.trainer import Trainer
    on = one_step(spm, tmp_path / "on")
    tr = Trainer(tiny_config(spm, tmp_path / "off", "stage=ett", "engine.precision=fp32"))
    tr.train_step(repeat(caption_batch(tr, CAPTIONS)))
    assert float(tr.log.sums["loss_cap"]) == on["loss_cap"] and "grad_ratio" not in tr.log.sums

"""Loading a checkpoint never runs code from it.

Checkpoints are shared and downloaded. A member whose ``__reduce__`` calls ``os.system`` is added to one file of a
real ZeRO-3 checkpoint; every entry point that reads checkpoints (evaluate, infer, export, train.init_from,
train.resume) must refuse it with a one-line error naming the file, and the command must never run.
"""
import os
import shutil

import pytest
import torch

from ett_ds.checkpoint import CheckpointError
from ett_ds.engine import dist
from ett_ds.trainer import Trainer
from tests.tiny import caption_batch, repeat, tiny_config, train_spm

MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class RunsACommand:
    """Pickles as ``os.system(command)``: unpickling it with weights_only=False runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def good_step(tmp_path_factory):
    dist.init_distributed()
    root = tmp_path_factory.mktemp("trust")
    spm = train_spm(root / "spm")
    tr = Trainer(tiny_config(spm, root, "stage=ett", "name=src", "engine.precision=fp32"))
    tr.train_step(repeat(caption_batch(tr, ["red fox", "blue sun", "a cat", "tree"])))
    return spm, tr.save()


def poisoned_copy(step, tmp_path, member):
    """A copy of the step folder (in its own run/checkpoints tree) with the malicious object added to ``member``."""
    dst = tmp_path / "run" / "checkpoints" / step.name
    shutil.copytree(step, dst)
    canary = tmp_path / "code_ran"
    obj = torch.load(dst / member, map_location="cpu", weights_only=False)  # our own file: trusted here
    obj["payload"] = RunsACommand(f"touch {canary}")
    torch.save(obj, dst / member)
    return dst, canary


def assert_refused(err: str, member: str, canary):
    assert not canary.exists(), "the checkpoint ran code"
    assert len(err.strip().splitlines()) == 1, err
    assert member in err and "posix.system" in err and "refused" in err, err


def test_the_payload_really_runs_under_a_plain_pickle_load(good_step, tmp_path):
    """The probe is real: DeepSpeed's own loaders (weights_only=False) would execute it."""
    step, member = good_step[1], MODEL_STATES
    dst, canary = poisoned_copy(step, tmp_path, member)
    torch.load(dst / member, weights_only=False)
    assert canary.exists()


@pytest.mark.parametrize("member", [MODEL_STATES, OPTIM_STATES])
def test_evaluate_infer_export_refuse_a_checkpoint_that_pickles_code(good_step, tmp_path, capsys, member):
    from PIL import Image

    from ett_ds import evaluate, export, infer
    dst, canary = poisoned_copy(good_step[1], tmp_path, member)
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 16), "white").save(image)
    commands = {
        "evaluate": lambda: evaluate.main(["--ckpt", str(dst), "--data", str(tmp_path / "none"), "--tasks", "recon",
                                           "--out", str(tmp_path / "m.json"), "--quiet"]),
        "infer": lambda: infer.main(["reconstruct", "--ckpt", str(dst), "--image", str(image),
                                     "--out", str(tmp_path / "r.png")]),
        "export": lambda: export.main(["--ckpt", str(dst), "--out", str(tmp_path / "exp")]),
    }
    for name, run in commands.items():
        capsys.readouterr()
        assert run() == 2, name
        assert_refused(capsys.readouterr().err, member, canary)


@pytest.mark.parametrize("member", [MODEL_STATES, OPTIM_STATES])
def test_init_from_refuses_a_checkpoint_that_pickles_code(good_step, tmp_path, member):
    spm, step = good_step
    dst, canary = poisoned_copy(step, tmp_path, member)
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny_config(spm, tmp_path, "stage=ett", "name=new", f"train.init_from={dst}"))
    assert_refused(str(e.value), member, canary)


@pytest.mark.parametrize("member", [MODEL_STATES, OPTIM_STATES, "extra_rank0.pt"])
def test_resume_refuses_a_checkpoint_that_pickles_code(good_step, tmp_path, member):
    """DeepSpeed's engine.load_checkpoint reads through the same safe loader, as does the per-rank extras file."""
    spm, step = good_step
    dst, canary = poisoned_copy(step, tmp_path, member)
    tr = Trainer(tiny_config(spm, tmp_path, "stage=ett", "name=run", "engine.precision=fp32"))
    with pytest.raises(CheckpointError) as e:
        tr.resume()
    assert_refused(str(e.value), member, canary)


def test_a_clean_checkpoint_resumes_and_consolidates_with_safe_loads_only(good_step, tmp_path):
    """The allow-list is enough for everything ett_ds writes: resume restores step and RNG, consolidation works."""
    from ett_ds.models.weights import consolidated_state_dict
    spm, step = good_step
    dst = tmp_path / "run" / "checkpoints" / step.name
    shutil.copytree(step, dst)
    tr = Trainer(tiny_config(spm, tmp_path, "stage=ett", "name=run", "engine.precision=fp32"))
    tr.resume()
    assert tr.step == 1
    sd = consolidated_state_dict(dst)
    assert "projector.0.weight" in sd or any(k.startswith("projector.") for k in sd)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())

"""Checkpoints survive kills, full disks, rollbacks, changed settings and a second job (issue 21 items 2, 5, 6, 10;
issue 24's checkpoint manager).

- a save is killed (SIGKILL, in a forked copy of a real ZeRO-3 Trainer) before every file-system operation it makes,
  and in the middle of every file it writes, in a normal run and over the folder of an abandoned branch: every
  folder marked complete loads, and a resume from the newest one works;
- a resume from an explicit older step moves the newer folders aside, so resume=auto never returns to them;
- a full disk during a save is one line, exit 2, and the previous checkpoint stays the newest complete one;
- a changed learning rate is applied on resume and said in one line; a changed architecture is one line, exit 2;
- a second job on a run folder that another job holds is refused in one line; a killed holder frees it.
"""
import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ett_ds import checkpoint as ckpt
from ett_ds.checkpoint.safe import read_safetensors, safe_load
from ett_ds.engine import dist
from ett_ds.models import weights
from ett_ds.train import main
from ett_ds.trainer import Trainer
from tests.tiny import build_demo, demo_train_args, repeat, subprocess_env, tiny_config, train_spm

REPO = Path(__file__).resolve().parents[1]
ABANDONED, LATEST = "abandoned", "latest"  # in checkpoints/: folders moved aside; DeepSpeed's pointer file


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    dist.init_distributed()
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 32, 8, 16)


def tokenizer_trainer(spm_model, out, *extra):
    """Stage tokenizer: ZeRO-3 shards with optimizer, discriminator, EMA shards and its safetensors, RNG states."""
    return Trainer(tiny_config(spm_model, out, "stage=tokenizer", "name=run", "engine.precision=fp32",
                               "train.ema_decay=0.9", "loss.gan_start_step=0", "train.keep_last=100", *extra))


def pixel_batches(tr):
    h, w = tr.cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    return repeat({"pixels": torch.rand(4, 3, h, w, generator=g) * 2 - 1})


def assert_loads(folder: Path) -> None:
    """What every reader of a complete step folder reads: trainer state, every rank's extras, the consolidated
    ZeRO weights (all shards), the tokenizer's EMA file."""
    state = ckpt.read_trainer_state(folder)
    for r in range(int(state["world_size"])):
        extra = safe_load(folder / f"extra_rank{r}.pt")
        assert {"gan", "ema", "rng"} <= set(extra), (folder, set(extra))
    sd = weights.consolidated_state_dict(folder)
    assert sd and all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert read_safetensors(folder / ckpt.TOKENIZER_EMA)


# -- kill -9 at every point of a save --------------------------------------------------------------------------------
class KillAt:
    """Counts the file-system operations of a save (every torch.save, file opened for writing, safetensors write,
    fsync, rename, replace, rmtree, mkdir); at operation ``at`` the process SIGKILLs itself: before the operation,
    or (``torn``, for writes of a whole file) after writing the first half of its bytes."""

    def __init__(self, at: int | None, torn: bool, counter: Path):
        self.n, self.at, self.torn, self.counter = 0, at, torn, counter

    def event(self, path=None, data: bytes | None = None):
        self.n += 1
        self.counter.write_text(str(self.n))
        if self.at is not None and self.n == self.at:
            if self.torn and path is not None and data is not None:
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self):
        real_save, real_open = torch.save, builtins.open
        real = {name: getattr(os, name) for name in ("rename", "replace", "fsync", "mkdir")}
        real_rmtree, real_st = shutil.rmtree, weights.save_safetensors
        me = self

        def save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)):
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                me.event(f, buf.getvalue())
            return real_save(obj, f, *a, **k)

        def opened(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)):
                me.event(file, b"")
            return real_open(file, mode, *a, **k)

        def wrap(fn):
            def inner(*a, **k):
                me.event()
                return fn(*a, **k)
            return inner

        def st(tensors, path, metadata=None):
            from safetensors.torch import save
            me.event(path, save(tensors, metadata=metadata))
            return real_st(tensors, path, metadata=metadata)

        torch.save = save
        builtins.open = opened
        for name, fn in real.items():
            setattr(os, name, wrap(fn))
        shutil.rmtree = wrap(real_rmtree)
        weights.save_safetensors = st


def single_rank_collectives() -> None:
    """In a forked child gloo's threads are gone: with one rank, every collective is a no-op anyway."""
    import deepspeed.comm as dcomm
    import torch.distributed as tdist
    assert dist.world_size() == 1
    for mod in (tdist, dcomm):
        for name in ("barrier", "all_reduce", "broadcast", "reduce"):
            if hasattr(mod, name):
                setattr(mod, name, lambda *a, **k: None)


def save_in_child(tr, step: int, kill: KillAt) -> int:
    """Fork; the child saves ``step`` under ``kill``; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            import faulthandler
            faulthandler.dump_traceback_later(60, exit=True, file=open(kill.counter.with_suffix(".hang"), "w"))
            single_rank_collectives()
            kill.install()
            tr.step = step
            tr.save()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def complete_folders(root: Path) -> list[Path]:
    return ckpt.step_dirs(root)


@pytest.mark.slow
def test_kill_9_at_every_point_of_a_save_leaves_only_loadable_complete_folders(spm_model, tmp_path):
    """Also over an abandoned branch's complete, good step folder of the same name (what a rollback with
    `train.resume=<older step>` met): the old code wrote into it and a kill left it complete with a torn
    model_states.pt."""
    tr = tokenizer_trainer(spm_model, tmp_path)
    it = pixel_batches(tr)
    assert tr.train_step(it)
    root = tr.ckpt_root
    tr.step = 1
    tr.save()
    counter = tmp_path / "count"
    assert os.WIFEXITED(save_in_child(tr, 2, KillAt(None, False, counter)))  # a whole save
    good = root / "step_00000002"
    assert_loads(good)
    (good / ckpt.GOOD).write_text("ok\n")  # step 2 now plays the abandoned branch's folder a rollback saves over
    pristine = tmp_path / "pristine_step_00000002"
    shutil.copytree(good, pristine)
    next_start = getattr(getattr(tr, "checkpoints", None), "prepare", lambda *a, **k: None)
    for step, case in ((3, "a new step"), (2, "over an abandoned branch's folder")):
        target = root / f"step_{step:08d}"
        assert os.WIFEXITED(save_in_child(tr, step, KillAt(None, False, counter)))  # a whole save, counted
        ops = int(counter.read_text())
        assert ops >= 10
        tried = 0
        for at in range(1, ops + 1):
            for torn in (False, True):
                if step == 3:
                    shutil.rmtree(target, ignore_errors=True)
                elif not (good / ckpt.GOOD).is_file():  # every try starts from the abandoned branch's folder
                    shutil.rmtree(good, ignore_errors=True)
                    shutil.copytree(pristine, good)
                status = save_in_child(tr, step, KillAt(at, torn, counter))
                tried += 1
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (at, torn, status)
                for folder in complete_folders(root):
                    assert_loads(folder)
                assert complete_folders(root)[0].name == "step_00000001", (at, torn)
                next_start(None, None, explicit=False)  # the next start removes what the killed save left
                assert not list(root.glob(".tmp-*")), (at, torn)
                for d in root.glob("step_*"):
                    assert ckpt.is_complete(d), (at, torn, d.name)  # no half-written folder under a step name
                assert (root / LATEST).read_text() == ckpt.latest(root).name, (at, torn)
        print(f"{case}: kill -9 at {tried} points of a save ({ops} file-system operations, before each and in the "
              "middle of each file write): every complete folder loaded")
    # a fresh job resumes from the newest complete folder
    tr2 = tokenizer_trainer(spm_model, tmp_path)
    tr2.resume()
    assert tr2.step == int(ckpt.latest(root).name[5:])


def test_a_save_never_writes_into_an_existing_folder(spm_model, tmp_path):
    tr = tokenizer_trainer(spm_model, tmp_path)
    assert tr.train_step(pixel_batches(tr))
    first = tr.save()
    (first / ckpt.GOOD).write_text("ok\n")
    inode = first.stat().st_ino
    again = tr.save()  # the same step again: what a rollback's save meets
    assert again == first and again.stat().st_ino != inode and not (again / ckpt.GOOD).exists()
    moved = list((tr.ckpt_root / ABANDONED).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("step_00000001-") and (moved[0] / ckpt.GOOD).is_file()
    assert (tr.ckpt_root / LATEST).read_text() == "step_00000001"
    assert not list(tr.ckpt_root.glob(".tmp-*"))


def test_resume_from_an_older_step_moves_the_abandoned_branch_aside(spm_model, tmp_path, capsys):
    import itertools
    import tarfile
    shard = tmp_path / "unused-000000.tar"  # fit() checks that data.train exists; the batches below replace it
    tarfile.open(shard, "w").close()
    tr = tokenizer_trainer(spm_model, tmp_path, "train.save_every=1", "train.max_steps=3", f"data.train={shard}")
    batches = pixel_batches(tr)
    tr.batches = lambda: batches
    tr.fit()
    root = tr.ckpt_root
    assert [d.name for d in ckpt.step_dirs(root)] == ["step_00000001", "step_00000002", "step_00000003"]
    tr2 = tokenizer_trainer(spm_model, tmp_path, "train.save_every=1", "train.max_steps=2", f"data.train={shard}",
                            f"train.resume={root / 'step_00000001'}")
    tr2.batches = lambda: itertools.islice(batches, 100)
    capsys.readouterr()
    tr2.fit()
    out = capsys.readouterr().out
    assert "moved 2 newer checkpoint folder(s) of the abandoned branch (step_00000002..step_00000003)" in out, out
    assert [d.name for d in ckpt.step_dirs(root)] == ["step_00000001", "step_00000002"]
    assert sorted(p.name.split("-")[0] for p in (root / ABANDONED).iterdir()) == ["step_00000002",
                                                                                       "step_00000003"]
    assert ckpt.latest(root).name == "step_00000002" and (root / LATEST).read_text() == "step_00000002"
    state = ckpt.read_trainer_state(ckpt.latest(root))
    assert state["step"] == 2
    rows = [json.loads(x)["step"] for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]


# -- a full disk ------------------------------------------------------------------------------------------------------
def tokenizer_args(demo, out, *extra):
    return demo_train_args(demo, out, "name=t", "stage=tokenizer", "train.save_every=1", "train.keep_last=10",
                           "train.log_every=1", "train.image_every=0", "loss.gan_start_step=0",
                           "train.ema_decay=0.9", "optim.warmup_ratio=0", *extra)


def one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_a_full_disk_is_one_line_exit_2_and_the_previous_checkpoint_stays_newest(demo, tmp_path, capsys,
                                                                                monkeypatch):
    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=1")) == 0
    root = tmp_path / "t" / "checkpoints"

    def full(*a, **k):  # the EMA file is the last one written before the marker
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(weights, "save_safetensors", full)
    capsys.readouterr()
    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=2")) == 2
    line = one_line(capsys.readouterr().err)
    assert "no space left on device: " in line and str(root) in line, line
    assert ckpt.latest(root).name == "step_00000001"
    assert [p.name for p in root.iterdir() if p.name.startswith(("step_", ".tmp"))] == ["step_00000001"]

    # torch's C++ writer reports a full disk as "basic_ios::clear: iostream error" (no errno): the disk is looked at
    monkeypatch.undo()
    real = torch.save

    def torn(obj, f, *a, **k):
        if str(f).endswith("extra_rank0.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", torn)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 0))
    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=2")) == 2
    line = one_line(capsys.readouterr().err)
    assert "no space left on device: " in line and "basic_ios" not in line, line
    assert ckpt.latest(root).name == "step_00000001"


# -- changed settings on resume ---------------------------------------------------------------------------------------
def test_a_changed_learning_rate_is_applied_and_said_and_a_changed_architecture_is_one_line(demo, tmp_path, capsys):
    from ett_ds import config as C
    from ett_ds.engine.deepspeed import lr_factor
    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=3", "train.stop_at=1")) == 0
    capsys.readouterr()
    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=3", "train.stop_at=2",
                               "optim.tokenizer_lr=0.004")) == 0
    out = capsys.readouterr().out
    assert "optimizer/schedule settings changed since step_00000001, applied from step 1 on: " \
           "optim.tokenizer_lr 0.002 -> 0.004" in out, out[-2000:]
    run = tmp_path / "t"
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    cfg = C.load_config(str(run / "config.yaml"), [])
    assert row["step"] == 2 and row["lr"] == pytest.approx(0.004 * lr_factor(2, cfg), rel=1e-9), row  # after step 2
    saved = C.load_config(str(run / "checkpoints" / "step_00000002" / "config.yaml"), [])
    assert saved.optim.tokenizer_lr == 0.004

    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=3", "model.tokenizer.codebook_size=512")) == 2
    line = one_line(capsys.readouterr().err)
    assert "shape [1024, " in line and "[512, " in line and "architecture changed" in line, line


# -- one job per run folder -------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from ett_ds.checkpoint.manager import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_job_on_a_held_run_folder_is_refused_and_a_killed_holder_frees_it(demo, tmp_path, capsys):
    run = tmp_path / "t"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=subprocess_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(tokenizer_args(demo, tmp_path, "train.max_steps=1")) == 2
        line = one_line(capsys.readouterr().err)
        assert f"run folder {run} is in use by another job (pid {holder.pid} on " in line, line
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a crash: the kernel drops the lock
        holder.wait()
    time.sleep(0.1)
    assert main(tokenizer_args(demo, tmp_path, "train.max_steps=1")) == 0
    assert ckpt.latest(run / "checkpoints").name == "step_00000001"

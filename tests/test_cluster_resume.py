"""Cluster life on CPU with the real deepspeed launcher (issue #13): preemption (a signal to the whole process group,
as SLURM sends it) ends a 2-rank job with one agreed checkpoint and exit 75, the rerun continues bitwise as the
uninterrupted run; a checkpoint written at world size 2 resumes at world size 1 and back at 2.

Stage `tokenizer`: its checkpoints hold every kind of state (ZeRO-3 shards with optimizer, the discriminator and its
optimizer, EMA shards, per-rank RNG states). Every step is saved (the data stream is reseeded at each save, so a
bitwise comparison needs both runs to save at the step the signal picks).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import build_demo, demo_train_args, run_group, subprocess_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 64, 8, 16)


def train_sh(demo, out, name, procs, *extra):
    """`launchers/train.sh` command and environment for `procs` local CPU processes."""
    args = demo_train_args(demo, out, f"name={name}", "stage=tokenizer", f"train.max_steps={STEPS}",
                           "train.save_every=1", "train.keep_last=100", "train.log_every=1", "train.image_every=0",
                           "loss.gan_start_step=2", "train.ema_decay=0.9", "optim.warmup_ratio=0", *extra)
    env = subprocess_env(ETT_NO_SETUP="1", ETT_NUM_PROCS=str(procs),
                         PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return ["bash", str(REPO / "launchers" / "train.sh"), "tiny", *args[2:]], env


def rows(run_dir):
    return [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" not in r]


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """The uninterrupted 2-rank run; it also provides world-size-2 checkpoints for the resharding test."""
    out = tmp_path_factory.mktemp("ref")
    cmd, env = train_sh(demo, out, "ref", 2)
    rc, so, se = run_group(cmd, 300, cwd=out, env=env)
    assert rc == 0, (so + se)[-4000:]
    return out / "ref"


def start_and_signal(cmd, env, cwd, metrics: Path, after_step: int, signals) -> tuple[int, str]:
    """Start `cmd` in its own process group; once `metrics` logs `after_step`, send `signals` to the whole group."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(json.loads(x).get("step", 0) >= after_step
                                         for x in metrics.read_text().splitlines() if x.endswith("}")):
                for sig in signals:
                    os.killpg(proc.pid, sig)
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no exit after {signals}; output tail:\n{out[-3000:]}")
    return proc.returncode, out


def test_signals_to_the_process_group_checkpoint_exit_75_and_the_rerun_continues_bitwise(demo, reference, tmp_path):
    """SIGUSR1 (time limit) and SIGTERM (preemption) both reach every process, the deepspeed launchers included:
    without the guard SIGUSR1 ends the launchers and SIGTERM makes launch.py terminate the workers."""
    cmd, env = train_sh(demo, tmp_path, "pre", 2)
    run = tmp_path / "pre"
    rc, out = start_and_signal(cmd, env, tmp_path, run / "metrics.jsonl", 2, [signal.SIGUSR1, signal.SIGTERM])
    assert rc == 75, out[-4000:]
    assert "[ett_ds] received SIG" in out and "exit 75 (requeue)" in out
    done = [r["step"] for r in rows(run)]
    stop = done[-1]
    assert 2 <= stop < STEPS and done == list(range(1, stop + 1)), out[-3000:]
    ckpt = run / "checkpoints" / f"step_{stop:08d}"
    assert (ckpt / "complete").is_file()
    assert sorted(p.name for p in ckpt.glob("extra_rank*.pt")) == ["extra_rank0.pt", "extra_rank1.pt"]
    leftovers = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left behind: {leftovers}"

    rc, so, se = run_group(cmd, 300, cwd=tmp_path, env=env)  # the requeued job
    assert rc == 0, (so + se)[-4000:]
    assert f"resumed from {ckpt}" in so + se
    got, want = rows(run), rows(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(want, got):
        for key in ("loss", "l1", "quant", "entropy", "gan_g", "loss_d", "lr"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))

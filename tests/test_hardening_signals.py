"""Issue 21 item 1: SIGTERM (scancel, preemption) sent to the whole process group while DataLoader workers run.

SLURM signals every process of a job step, so the loader workers get the signal too. They must leave it to their
training process (which stops at the next step boundary, writes one complete checkpoint and exits 75), and that
process must shut them down as it exits: no process of the group is left.
"""
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.process_group import metrics_reached, start_signal_wait
from tests.tiny import build_demo, demo_train_args, subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 64, 8, 16)


# ------------------------------------------------------------------------------------------------ the loader alone
# a script's start: the preemption guard installed, then the training loader over the shards in sys.argv[1]
LOADER_HEAD = textwrap.dedent("""
    import sys, time
    from ett_ds.engine import preempt
    preempt.install()
    from ett_ds.data.shards import train_batches

    def make_example(sample):
        return sample["__key__"]

    def collate(keys):
        return {"keys": keys}
""")

LOADER_SCRIPT = LOADER_HEAD + textwrap.dedent("""
    n = 0
    for batch in train_batches(sys.argv[1], batch_size=4, make_example=make_example, collate=collate,
                               num_workers=2, shuffle_buffer=8):
        n += 1
        print("batch", n, flush=True)
        if n >= 3 and preempt.received():
            break
        time.sleep(0.3)
    print("stopped on", preempt.received(), flush=True)
    sys.exit(preempt.REQUEUE_EXIT if preempt.received() else 0)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_loader_workers_leave_the_signal_to_the_main_process(demo, tmp_path, sig):
    """train_batches with 2 workers: the signal to the group is the main process's; the workers survive it (no
    'DataLoader worker ... is killed by signal') and are gone when the main process exits."""
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)
    log = tmp_path / "log"
    rc, out, members, left = start_signal_wait([sys.executable, str(script), str(demo / "train")], subprocess_env(),
                                               REPO, lambda: "batch 1" in log.read_text(), [sig], timeout=120, log=log)
    assert len(members) >= 3, members  # the main process and its 2 workers were there when the signal came
    assert rc == 75, out[-3000:]
    assert f"stopped on {sig.name}" in out and "killed by signal" not in out, out[-3000:]
    assert not left, f"processes left behind: {left}"


EXIT_SCRIPT = LOADER_HEAD + textwrap.dedent("""
    it = train_batches(sys.argv[1], batch_size=4, make_example=make_example, collate=collate, num_workers=2,
                       shuffle_buffer=8)
    next(it)
    print("one batch", flush=True)
    raise RuntimeError("the run fails with its loader still referenced")
""")


def test_workers_still_end_when_the_main_process_exits_with_the_loader_alive(demo, tmp_path):
    """The workers ignore only other processes' SIGTERM: at interpreter exit, multiprocessing terminates the
    still-running workers with SIGTERM from the training process, and that still ends them (no hang, none left)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    rc, out, _, left = start_signal_wait([sys.executable, str(script), str(demo / "train")], subprocess_env(), REPO,
                                         lambda: False, [], timeout=120)  # no signal: wait for the exit
    assert rc == 1 and "one batch" in out and "still referenced" in out, out[-3000:]
    assert not left, f"processes left behind: {left}"


# ------------------------------------------------------------------------------------------------ real trainings
STEPS = 200  # never reached: the signal comes after step 2


def check_preempted(run: Path, rc: int, out: str, left: list[str], ranks: int) -> None:
    assert rc == 75, out[-4000:]
    assert "killed by signal" not in out, out[-4000:]
    assert "[ett_ds] received SIGTERM" in out and "exit 75 (requeue)" in out, out[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if x.endswith("}") and "step" in json.loads(x) and "eval" not in json.loads(x)]
    stop = steps[-1]
    assert 2 <= stop < STEPS, out[-3000:]
    ckpt = run / "checkpoints" / f"step_{stop:08d}"
    assert (ckpt / "complete").is_file(), sorted(p.name for p in (run / "checkpoints").glob("*/*"))
    assert sorted(p.name for p in ckpt.glob("extra_rank*.pt")) == [f"extra_rank{r}.pt" for r in range(ranks)]
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
def test_sigterm_to_the_group_with_loader_workers_one_process(demo, tmp_path):
    """`python -m ett_ds.train` with data.num_workers=2; SIGTERM to its whole process group after step 2: exit 75,
    a complete checkpoint, no process left (before the fix: exit 1, 'DataLoader worker (pid N) is killed by
    signal: Terminated', no checkpoint)."""
    args = demo_train_args(demo, tmp_path, "name=t1", "stage=tokenizer", f"train.max_steps={STEPS}",
                           "train.save_every=1000", "train.log_every=1", "train.image_every=0",
                           "data.num_workers=2")
    cmd = [sys.executable, "-m", "ett_ds.train", *args]
    run = tmp_path / "t1"
    rc, out, members, left = start_signal_wait(cmd, subprocess_env(), REPO, metrics_reached(run / "metrics.jsonl", 2),
                                               [signal.SIGTERM])
    assert len(members) >= 3, members  # the training process and its two loader workers
    check_preempted(run, rc, out, left, 1)


@pytest.mark.slow
def test_sigterm_to_the_group_with_loader_workers_two_ranks_through_train_sh(demo, tmp_path):
    """The same with 2 ranks started by launchers/train.sh (deepspeed launcher behind the signal guard), each rank
    with 2 loader workers: exit 75 (what launchers/slurm.sbatch requeues on), a complete 2-rank checkpoint, no
    process left."""
    args = demo_train_args(demo, tmp_path, "name=t2", "stage=tokenizer", f"train.max_steps={STEPS}",
                           "train.save_every=1000", "train.log_every=1", "train.image_every=0",
                           "data.num_workers=2")
    env = subprocess_env(ETT_NO_SETUP="1", ETT_NUM_PROCS="2",
                         PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["bash", str(REPO / "launchers" / "train.sh"), "tiny", *args[2:]]
    run = tmp_path / "t2"
    rc, out, members, left = start_signal_wait(cmd, env, tmp_path, metrics_reached(run / "metrics.jsonl", 2),
                                               [signal.SIGTERM])
    assert len(members) >= 6, members  # launchers + 2 ranks + 4 loader workers
    check_preempted(run, rc, out, left, 2)

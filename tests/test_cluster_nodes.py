"""Two SLURM nodes on one machine (issue #13): `launchers/train.sh` in its `srun` mode, and the one-process-per-task
form `srun python -m ett_ds.train`, with stand-ins for `scontrol` and `srun` on PATH that start every task of the
step locally (at once, each with its own SLURM_NODEID / SLURM_PROCID / SLURM_LOCALID), on host names that resolve
to this machine. The deepspeed launcher, the rendezvous and the training are the real ones, at world size 2.

Which shards each rank opens is recorded by an audit hook (sitecustomize.py on PYTHONPATH, `open` events only): it
observes, it replaces nothing.
"""
import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny import build_demo, demo_train_args, run_group, subprocess_env

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

REPO = Path(__file__).resolve().parents[1]
HOSTS = ["localhost", "127.0.0.1"]  # two "nodes", both this machine

FAKE_SCONTROL = """\
    #!/bin/sh
    [ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
    printf '%s\\n' $FAKE_HOSTS
    """

FAKE_SRUN = """\
    #!/usr/bin/env python3
    # srun stand-in: every task of the step at once, one environment per task as slurmstepd sets it;
    # --kill-on-bad-exit: the first failing task ends the others.
    import os, subprocess, sys, time
    args, opts = sys.argv[1:], {}
    while args and args[0].startswith("-"):
        key, _, value = args.pop(0).lstrip("-").partition("=")
        opts[key] = value
    hosts = os.environ["FAKE_HOSTS"].split()
    ntasks = int(opts.get("ntasks") or os.environ["SLURM_NTASKS"])
    nodes = int(opts.get("nodes") or len(hosts))
    per_node = ntasks // nodes
    procs = []
    for task in range(ntasks):
        node = task // per_node
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
                   SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NODELIST=",".join(hosts[:nodes]),
                   SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURMD_NODENAME=hosts[node])
        procs.append(subprocess.Popen(args, env=env))
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    sys.exit(max(abs(p.returncode) for p in procs))
    """

SPY = """\
    import os, sys
    if os.environ.get("SHARD_SPY"):
        def _hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].endswith(".tar"):
                rank = os.environ.get("RANK")
                if rank is not None:
                    with open(os.path.join(os.environ["SHARD_SPY"], f"rank{rank}.txt"), "a") as f:
                        f.write(os.path.basename(args[0]) + "\\n")
        sys.addaudithook(_hook)
    """


def job_id_with_free_port() -> str:
    """A SLURM job id whose derived port (20000 + id % 20000, ett_ds.engine.dist and train.sh) is free now."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 40000:
            return str(port - 20000 + 40000)  # any id with that remainder; not the port itself
    pytest.skip("the kernel handed out no free port in 20000-39999")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 64, 8, 16)


def cluster(tmp_path, **extra):
    bin_dir, spy_dir, site = tmp_path / "bin", tmp_path / "spy", tmp_path / "site"
    for d in (bin_dir, spy_dir, site):
        d.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(textwrap.dedent(text))
        (bin_dir / name).chmod(0o755)
    (site / "sitecustomize.py").write_text(textwrap.dedent(SPY))
    env = subprocess_env(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        FAKE_HOSTS=" ".join(HOSTS), SHARD_SPY=str(spy_dir), ETT_NO_SETUP="1", CUDA_VISIBLE_DEVICES="",
        DS_ACCELERATOR="cpu", SLURM_JOB_ID=job_id_with_free_port(), SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST=",".join(HOSTS), SLURM_NNODES="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env.pop("MASTER_PORT", None)
    return env, spy_dir


def check_two_rank_run(run: Path, spy: Path, steps: int, micro: int):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 2 * micro  # world size 2
    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    assert (ckpt / "complete").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("extra_rank*.pt")) == ["extra_rank0.pt", "extra_rank1.pt"]
    assert len(list(ckpt.glob("*model_states.pt"))) == 2
    opened = {r: (spy / f"rank{r}.txt").read_text().split() for r in (0, 1)}
    assert opened[0] and opened[1] and opened[0] != opened[1], opened  # each rank reads its own stream


def test_train_sh_srun_mode_two_nodes_one_process_each(demo, tmp_path):
    env, spy = cluster(tmp_path, ETT_LAUNCH_DIR=str(tmp_path / "launch"))
    args = demo_train_args(demo, tmp_path, "name=srun", "train.max_steps=3", "train.log_every=1",
                           "train.save_every=100", "train.image_every=0")
    cmd = ["bash", str(REPO / "launchers" / "train.sh"), "tiny", *args[2:]]
    rc, out, err = run_group(cmd, 300, cwd=tmp_path, env=env)
    assert rc == 0, (out + err)[-4000:]
    assert "mode=srun nodes=2 slots/node=1 world=2" in err
    assert (tmp_path / "launch" / "hostfile").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    check_two_rank_run(tmp_path / "srun", spy, 3, 4)


def test_srun_one_process_per_task(demo, tmp_path):
    env, spy = cluster(tmp_path, SLURM_NTASKS="2", OMP_NUM_THREADS="1")
    args = demo_train_args(demo, tmp_path, "name=tasks", "train.max_steps=2", "train.log_every=1",
                           "train.save_every=100", "train.image_every=0")
    cmd = ["srun", "--ntasks=2", "--ntasks-per-node=1", sys.executable, "-u", "-m", "ett_ds.train", *args]
    rc, out, err = run_group(cmd, 300, cwd=tmp_path, env=env)
    assert rc == 0, (out + err)[-4000:]
    check_two_rank_run(tmp_path / "tasks", spy, 2, 4)

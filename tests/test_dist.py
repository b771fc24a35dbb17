"""ett_ds.engine.dist: SLURM -> torch variable mapping, node lists, and a real single-process init on CPU."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from ett_ds.engine import dist as ettdist
from ett_ds.engine.dist import (
    apply_slurm_env,
    expand_nodelist,
    map_slurm_env,
    parse_tasks_per_node,
    port_from_job_id,
    world_info,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------------ node lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[01-04,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu5"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("a,b-c,d[1]", ["a", "b-c", "d1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x-[3]-y", ["x-3-y"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "a[", "a]", "a[]", "a[1-", "a[4-2]", "a[x-y]", "a,,b", "a[1[2]]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


@pytest.mark.parametrize("spec, counts", [("8", [8]), ("4(x2)", [4, 4]), ("2,1", [2, 1]), ("4(x2),1", [4, 4, 1])])
def test_parse_tasks_per_node(spec, counts):
    assert parse_tasks_per_node(spec) == counts


def test_port_from_job_id():
    assert port_from_job_id("4242") == 24242
    assert port_from_job_id("123456") == 23456
    assert port_from_job_id(None) == port_from_job_id("abc") == 29500


# ------------------------------------------------------------------------------------------------ mapping
def test_one_node_eight_tasks():
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "5", "SLURM_NODEID": "0",
           "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "8", "SLURM_JOB_NODELIST": "gpu07"}
    assert map_slurm_env(env) == {"RANK": "5", "LOCAL_RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8",
                                  "MASTER_ADDR": "gpu07", "MASTER_PORT": "24242"}


def test_four_nodes_one_task_each():
    env = {"SLURM_JOB_ID": "17", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
           "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_JOB_NODELIST": "node[001-004]"}
    assert map_slurm_env(env) == {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "1",
                                  "MASTER_ADDR": "node001", "MASTER_PORT": "20017"}


def test_two_nodes_four_tasks_each():
    env = {"SLURM_JOB_ID": "20001", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[12,15]"}
    assert map_slurm_env(env) == {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                  "MASTER_ADDR": "gpu12", "MASTER_PORT": "20001"}


def test_uneven_tasks_per_node_uses_this_node():
    env = {"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "3",
           "SLURM_TASKS_PER_NODE": "2,1", "SLURM_JOB_NODELIST": "a[1-2]"}
    mapped = map_slurm_env(env)
    assert mapped["LOCAL_WORLD_SIZE"] == "1" and mapped["WORLD_SIZE"] == "3" and mapped["MASTER_ADDR"] == "a1"


def test_step_variables_win_over_job_variables():
    # an srun step that uses 2 of the job's 4 tasks, on the job's last two nodes
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
           "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]"}
    mapped = map_slurm_env(env)
    assert (mapped["WORLD_SIZE"], mapped["LOCAL_WORLD_SIZE"], mapped["MASTER_ADDR"]) == ("2", "1", "n3")


@pytest.mark.parametrize("present", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_torch_variables_present_leaves_everything(present):
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu01", present: "0"}
    assert map_slurm_env(env) == {}


def test_never_overrides_master_variables():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x[", "SLURM_JOB_ID": "9",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    mapped = map_slurm_env(env, scontrol="/nonexistent/scontrol")  # the bad node list is not even looked at
    assert "MASTER_ADDR" not in mapped and "MASTER_PORT" not in mapped and mapped["RANK"] == "0"


def test_not_under_slurm():
    assert map_slurm_env({"PATH": "/usr/bin"}) == {}
    assert map_slurm_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a1"}) == {}   # batch shell, no srun task


def test_unparseable_nodelist_falls_back_to_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        [ "$1 $2" = "show hostnames" ] || exit 3
        echo "$3" > "$(dirname "$0")/asked"
        printf 'weird-a\\nweird-b\\n'
        """))
    fake.chmod(0o755)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "weird-[a,b]"}
    assert map_slurm_env(env, scontrol=str(fake))["MASTER_ADDR"] == "weird-a"
    assert (tmp_path / "asked").read_text().strip() == "weird-[a,b]"


def _slurm_only(monkeypatch, **slurm):
    for key in TORCH_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)


def test_apply_slurm_env_and_world_info(monkeypatch):
    _slurm_only(monkeypatch, SLURM_JOB_ID="5", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4",
                SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="g[1-2]")
    assert world_info() == (3, 1, 4)            # read-only: nothing set yet
    assert "RANK" not in os.environ
    assert apply_slurm_env() == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                                 "MASTER_ADDR": "g1", "MASTER_PORT": "20005"}
    assert os.environ["MASTER_ADDR"] == "g1" and world_info() == (3, 1, 4)
    assert apply_slurm_env() == {}              # second call: torch's variables now exist


def test_world_info_defaults(monkeypatch):
    _slurm_only(monkeypatch)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert world_info() == (0, 0, 1)


def test_single_process_defaults(monkeypatch):
    _slurm_only(monkeypatch)
    ettdist._set_single_process_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert int(os.environ["MASTER_PORT"]) > 0


def test_helpers_in_one_process():
    # works whether or not another test in this session initialised a (world size 1) process group
    tensor = torch.tensor([1.0, 2.0])
    assert ettdist.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    assert ettdist.broadcast_object({"step": 3}) == {"step": 3}
    ettdist.barrier()
    assert ettdist.is_rank0() and ettdist.rank() == 0 and ettdist.world_size() == 1


# ------------------------------------------------------------------------------------------------ real init
_INIT_SCRIPT = """
import os, torch, torch.distributed as d
from ett_ds.engine import dist
dist.init_distributed()
dist.init_distributed()                       # idempotent
import deepspeed.ops
print("backend", d.get_backend(), d.get_rank(), d.get_world_size())
print("env", os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"], os.environ["DS_ACCELERATOR"])
print("shm", deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"])
print("sum", dist.all_reduce_sum(torch.ones(3)).tolist(), dist.broadcast_object("hi"), dist.is_rank0())
print("rank", dist.rank(), dist.world_size())
dist.shutdown()
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in TORCH_ENV and k != "DS_ACCELERATOR" and not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return env


def _parse(stdout):
    return dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)


def test_init_distributed_without_any_launcher(tmp_path):
    """A bare `python` process (no torch or SLURM variables) becomes rank 0 of 1 on gloo, for real."""
    proc = subprocess.run([sys.executable, "-c", _INIT_SCRIPT], env=_clean_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _parse(proc.stdout)
    assert lines["backend"] == "gloo 0 1"
    assert lines["env"] == "0 0 1 cpu"
    assert lines["shm"] == "False"              # no JIT compile of DeepSpeed's shm all-reduce
    assert lines["sum"] == "[1.0, 1.0, 1.0] hi True"
    assert lines["rank"] == "0 1"


@pytest.mark.slow
def test_init_distributed_two_srun_tasks(tmp_path):
    """Two processes with only SLURM's variables (srun, one task per GPU) form one group of 2 and all-reduce."""
    base = _clean_env()
    base.update(SLURM_JOB_ID="3", SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="2", SLURM_NODEID="0",
                SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    script = _INIT_SCRIPT.replace('"hi"', 'f"from{d.get_rank()}"')
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, text=True,
                              env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        lines = _parse(out)
        assert lines["backend"] == f"gloo {r} 2"
        assert lines["env"] == f"{r} {r} 2 cpu"
        assert lines["sum"] == f"[2.0, 2.0, 2.0] from0 {r == 0}"

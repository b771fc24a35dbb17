"""launchers/train.sh: the exact commands it builds, on one machine and in a (faked) SLURM allocation.

SLURM, srun, nvidia-smi and deepspeed are small scripts on PATH. The fake srun runs its command once per node with
that node's SLURM_NODEID, and the fake deepspeed prints its argv, so the srun mode is executed end to end; the argv
is also checked against DeepSpeed's own argument parser.
"""
import json
import os
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "launchers" / "train.sh"
JOB_ID = 777
PORT = str(20000 + JOB_ID)
HOSTS = ["gpu01", "gpu02", "gpu10"]

FAKES = {
    "scontrol": """\
        #!/bin/sh
        [ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
        echo "$3" >> "$FAKE_LOG/scontrol"
        printf '%s\\n' $FAKE_HOSTS
        """,
    "srun": """\
        #!/usr/bin/env python3
        import os, subprocess, sys
        args = sys.argv[1:]
        opts = {}
        while args[0].startswith("--"):
            key, _, value = args.pop(0)[2:].partition("=")
            opts[key] = value
        for node in range(int(opts["nodes"])):
            env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node))
            subprocess.run(args, env=env, check=True)
        """,
    "deepspeed": """\
        #!/usr/bin/env python3
        import json, os, sys
        print("DS " + json.dumps({"argv": sys.argv[1:], "env_file": os.environ.get("DS_ENV_FILE"),
                                  "omp": os.environ.get("OMP_NUM_THREADS")}))
        """,
    "nvidia-smi": """\
        #!/bin/sh
        echo "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)"
        echo "GPU 1: NVIDIA H200 (UUID: GPU-bbbb)"
        echo "GPU 2: NVIDIA H200 (UUID: GPU-cccc)"
        """,
}


@pytest.fixture
def sandbox(tmp_path):
    """A working dir, a recipe, fake tools on PATH and a clean environment (no inherited SLURM/OMP/MASTER vars)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(textwrap.dedent(text))
        (bin_dir / name).chmod(0o755)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {}\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "ETT_NO_SETUP": "1",
           "ETT_NO_VALIDATE": "1",  # the placeholder recipe is not a real one (the check: test_cluster_preflight.py)
           "FAKE_LOG": str(tmp_path), "FAKE_HOSTS": " ".join(HOSTS), "TORCH_EXTENSIONS_DIR": "/x/ext"}
    return {"dir": tmp_path, "bin": bin_dir, "recipe": str(recipe), "env": env}


def slurm_env(box, **extra):
    env = dict(box["env"], SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[01-02],gpu10",
               SLURM_GPUS_PER_NODE="h200:4", SLURM_CPUS_PER_TASK="16", CUDA_VISIBLE_DEVICES="0,1,2,3")
    env.update(extra)
    return env


def train_sh(box, *args, env=None):
    return subprocess.run(["bash", str(TRAIN_SH), *args], cwd=box["dir"], env=env or box["env"],
                          capture_output=True, text=True, timeout=60)


def commands(stdout):
    """The `+ VAR=value ... cmd args` lines of a dry run, as (env dict, argv)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("+ "):
            words = shlex.split(line[2:])
            env = {}
            while words and "=" in words[0] and words[0].split("=")[0].isidentifier():
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            out.append((env, words))
    return out


def only_command(proc):
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    assert len(cmds) == 1, proc.stdout
    return cmds[0]


@pytest.fixture(scope="module")
def ds_parse():
    """DeepSpeed 0.19's own launcher argument parser (checks that every flag we pass exists)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.launcher.runner import parse_args
    return parse_args


# ------------------------------------------------------------------------------------------------ one machine
def test_cpu_dry_run_sets_procs_and_threads(sandbox):
    env = dict(sandbox["env"], ETT_NUM_PROCS="2", CUDA_VISIBLE_DEVICES="")
    cmd_env, argv = only_command(train_sh(sandbox, sandbox["recipe"], "optim.lr=1e-4", "--dry-run", env=env))
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert cmd_env == {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}
    assert argv[:3] == ["deepspeed", "--num_gpus", "2"] and argv[3] == "--master_port"
    assert argv[5:] == ["--module", "ett_ds.train", "--config", sandbox["recipe"], "optim.lr=1e-4"]


def test_local_run_without_master_port_takes_a_free_port_not_29500(sandbox, ds_parse):
    """Two local jobs on one machine (or a test beside a training) must not both bind DeepSpeed's default 29500."""
    import socket
    env = dict(sandbox["env"], ETT_NUM_PROCS="2", CUDA_VISIBLE_DEVICES="")
    with socket.socket() as busy:  # whoever holds 29500 now, nothing may depend on it being free
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass
        ports = []
        for _ in range(2):
            _, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--dry-run", env=env))
            ports.append(int(ds_parse(argv[1:]).master_port))
    assert 29500 not in ports and all(1024 <= p < 65536 for p in ports), ports
    for port in ports:  # free when chosen: binding it here works
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_cpu_defaults_to_one_process_and_keeps_user_threads(sandbox):
    env = dict(sandbox["env"], OMP_NUM_THREADS="3", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
               PYTHONPATH=f"/elsewhere:{REPO}")
    cmd_env, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--dry-run", env=env))
    assert cmd_env == {}
    assert argv[:3] == ["deepspeed", "--num_gpus", "1"]


def test_gpu_count_from_nvidia_smi(sandbox, ds_parse):
    cmd_env, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--dry-run"))
    assert "DS_ACCELERATOR" not in cmd_env
    assert argv[:3] == ["deepspeed", "--num_gpus", "3"]
    args = ds_parse(argv[1:])
    assert (args.num_gpus, args.module, args.user_script, args.user_args) == (
        3, True, "ett_ds.train", ["--config", sandbox["recipe"]])


def test_visible_devices_become_include(sandbox):
    # --num_gpus would make deepspeed drop CUDA_VISIBLE_DEVICES and use GPUs 0..N-1
    env = dict(sandbox["env"], CUDA_VISIBLE_DEVICES="4,6,7", ETT_NUM_PROCS="2", MASTER_PORT="29999")
    _, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--dry-run", env=env))
    assert argv[:5] == ["deepspeed", "--include", "localhost:4,6", "--master_port", "29999"]


def test_recipe_by_name(sandbox):
    recipes = sorted((REPO / "ett_ds" / "recipes").glob("tiny.yaml"))  # own.yaml needs data.train (its own test)
    if not recipes:
        pytest.skip("no recipe in ett_ds/recipes yet")
    env = dict(sandbox["env"], CUDA_VISIBLE_DEVICES="")
    _, argv = only_command(train_sh(sandbox, recipes[0].stem, "--dry-run", env=env))
    assert argv[argv.index("--config") + 1] == str(recipes[0])


def test_one_node_allocation_runs_locally(sandbox):
    env = slurm_env(sandbox, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu01")
    _, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--dry-run", env=env))
    assert argv[:5] == ["deepspeed", "--include", "localhost:0,1,2,3", "--master_port", PORT]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, message", [
    (["no/such/recipe.yaml"], "recipe 'no/such/recipe.yaml' not found"),
    (["RECIPE", "--mode", "mpi"], "bad mode 'mpi'"),
    (["RECIPE", "--mode", "srun"], "needs a SLURM allocation"),
    (["RECIPE", "notakeyvalue"], "expected key=value"),
    ([], "missing RECIPE"),
])
def test_errors_are_one_line(sandbox, args, message):
    args = [sandbox["recipe"] if a == "RECIPE" else a for a in args]
    proc = train_sh(sandbox, *args, "--dry-run")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("train.sh: error: ") and message in proc.stderr


def test_bad_mode_from_environment(sandbox):
    proc = train_sh(sandbox, sandbox["recipe"], env=dict(sandbox["env"], ETT_LAUNCH_MODE="ssh"))
    assert proc.returncode != 0
    assert proc.stderr.strip() == "train.sh: error: bad mode 'ssh' (expected local, srun or pdsh)"


def test_pdsh_mode_needs_pdsh(sandbox):
    proc = train_sh(sandbox, sandbox["recipe"], "--mode", "pdsh", env=slurm_env(sandbox))
    assert proc.returncode != 0 and "pdsh mode needs pdsh" in proc.stderr.splitlines()[-1]


# ------------------------------------------------------------------------------------------------ SLURM
def test_srun_dry_run_command(sandbox, ds_parse):
    proc = train_sh(sandbox, sandbox["recipe"], "a=1", "--dry-run", env=slurm_env(sandbox))
    cmd_env, argv = only_command(proc)
    launch = sandbox["dir"] / "logs" / "launch" / str(JOB_ID)
    hostfile, env_file = str(launch / "hostfile"), str(launch / ".deepspeed_env")
    assert cmd_env == {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "4", "DS_ENV_FILE": env_file}  # 16 cpus/4 GPUs
    script = ('exec "$(command -v python3 || command -v python)" -m ett_ds.engine.preempt deepspeed '
              '--node_rank="$SLURM_NODEID" "$@"')  # the signal guard: test_cluster_preempt.py
    assert argv == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "--cpus-per-task=16", "bash", "-c", script, "deepspeed",
                    "--no_ssh", "--hostfile", hostfile, "--master_addr", "gpu01", "--master_port", PORT,
                    "--module", "ett_ds.train", "--config", sandbox["recipe"], "a=1"]
    # what one node runs, as DeepSpeed parses it
    args = ds_parse(["--node_rank=2"] + argv[argv.index("deepspeed") + 1:])
    assert (args.no_ssh, args.node_rank, args.hostfile, args.master_addr, args.master_port) == (
        True, 2, hostfile, "gpu01", int(PORT))
    assert (args.user_script, args.user_args) == ("ett_ds.train", ["--config", sandbox["recipe"], "a=1"])
    # the dry run shows the hostfile but writes nothing
    assert "\n".join(f"{h} slots=4" for h in HOSTS) in proc.stdout
    assert not launch.exists()
    assert (sandbox["dir"] / "scontrol").read_text().split() == ["gpu[01-02],gpu10"]


def test_pdsh_dry_run_command(sandbox, ds_parse):
    env = slurm_env(sandbox, ETT_LAUNCH_MODE="pdsh", MASTER_PORT="31000", ETT_LAUNCH_DIR=str(sandbox["dir"] / "L"))
    cmd_env, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--dry-run", env=env))
    hostfile = str(sandbox["dir"] / "L" / "hostfile")
    assert cmd_env["DS_ENV_FILE"] == str(sandbox["dir"] / "L" / ".deepspeed_env")
    assert argv == ["deepspeed", "--launcher", "pdsh", "--hostfile", hostfile, "--master_addr", "gpu01",
                    "--master_port", "31000", "--module", "ett_ds.train", "--config", sandbox["recipe"]]
    args = ds_parse(argv[1:])
    assert (args.launcher, args.no_ssh, args.hostfile, args.master_port) == ("pdsh", False, hostfile, 31000)


def test_mode_flag_overrides_environment(sandbox):
    env = slurm_env(sandbox, ETT_LAUNCH_MODE="pdsh")
    _, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--mode=srun", "--dry-run", env=env))
    assert argv[0] == "srun"
    _, argv = only_command(train_sh(sandbox, sandbox["recipe"], "--mode", "local", "--dry-run", env=env))
    assert argv[0] == "deepspeed" and "--hostfile" not in argv


def test_srun_mode_runs_one_launcher_per_node(sandbox):
    """Not a dry run: hostfile and worker environment written, each node's deepspeed gets its own --node_rank."""
    env = slurm_env(sandbox, ETT_FOO="bar", MY_CACHE="/data/cache", ETT_EXPORT_VARS="MY_CACHE,BAD",
                    BAD='has "quotes"', HF_HOME="/shared/hf", NCCL_DEBUG="WARN")
    proc = train_sh(sandbox, sandbox["recipe"], "x=2", env=env)
    assert proc.returncode == 0, proc.stderr
    launch = sandbox["dir"] / "logs" / "launch" / str(JOB_ID)
    assert (launch / "hostfile").read_text() == "gpu01 slots=4\ngpu02 slots=4\ngpu10 slots=4\n"
    lines = (launch / ".deepspeed_env").read_text().splitlines()
    pairs = dict(line.split("=", 1) for line in lines)
    assert pairs["ETT_FOO"] == "bar" and pairs["MY_CACHE"] == "/data/cache" and pairs["HF_HOME"] == "/shared/hf"
    assert pairs["OMP_NUM_THREADS"] == "4" and pairs["TORCH_EXTENSIONS_DIR"] == "/x/ext"
    assert pairs["PATH"] == env["PATH"]
    assert "BAD" not in pairs and "NCCL_DEBUG" not in pairs   # unquotable; NCCL_* travel by themselves
    runs = [json.loads(line[3:]) for line in proc.stdout.splitlines() if line.startswith("DS ")]
    assert [r["argv"][0] for r in runs] == ["--node_rank=0", "--node_rank=1", "--node_rank=2"]
    for run in runs:
        assert run["argv"][1:4] == ["--no_ssh", "--hostfile", str(launch / "hostfile")]
        assert run["argv"][-3:] == ["--config", sandbox["recipe"], "x=2"]
        assert run["env_file"] == str(launch / ".deepspeed_env") and run["omp"] == "4"


def test_cpu_cluster_uses_processes_per_node(sandbox):
    env = slurm_env(sandbox, CUDA_VISIBLE_DEVICES="", ETT_GPUS_PER_NODE="2", SLURM_CPUS_PER_TASK="8")
    del env["SLURM_GPUS_PER_NODE"]
    proc = train_sh(sandbox, sandbox["recipe"], "--dry-run", env=env)
    cmd_env, argv = only_command(proc)
    assert cmd_env["DS_ACCELERATOR"] == "cpu" and cmd_env["OMP_NUM_THREADS"] == "4"
    assert "gpu01 slots=2" in proc.stdout


def test_scripts_are_shellcheck_clean():
    if subprocess.run(["sh", "-c", "command -v shellcheck"], capture_output=True).returncode:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", "-x", "launchers/train.sh", "launchers/slurm.sbatch"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout

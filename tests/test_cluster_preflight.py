"""`launchers/train.sh --dry-run` checks the recipe and overrides as the trainer will, and prints the plan."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, *args, **env_extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\nprintf "%s\\n" nodeA nodeB\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
           "HOME": str(tmp_path), "ETT_NO_SETUP": "1", "CUDA_VISIBLE_DEVICES": "", **env_extra}
    return subprocess.run(["bash", str(REPO / "launchers" / "train.sh"), "tiny", *args, "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_rejects_a_misspelt_override_in_one_line(tmp_path):
    proc = dry_run(tmp_path, "train.max_step=5")
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "unknown config key 'train.max_step'" in err[0], proc.stderr
    assert "+ deepspeed" not in proc.stdout  # nothing would be launched


def test_dry_run_rejects_a_global_batch_the_world_size_does_not_divide(tmp_path):
    proc = dry_run(tmp_path, "train.micro_batch_size=4", "train.global_batch_size=20", ETT_NUM_PROCS="2")
    assert proc.returncode == 2 and "not a multiple of micro_batch_size x ranks = 4 x 2" in proc.stderr


def test_dry_run_prints_world_size_accumulation_and_global_batch(tmp_path):
    local = dry_run(tmp_path, "train.micro_batch_size=4", "train.global_batch_size=32", ETT_NUM_PROCS="2")
    assert local.returncode == 0, local.stderr
    assert "# plan: stage=ett world_size=2 micro_batch=4 accumulation=4 global_batch=32" in local.stdout
    slurm = dry_run(tmp_path, "train.micro_batch_size=4", "train.global_batch_size=32", SLURM_JOB_ID="5",
                    SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[A-B]", ETT_GPUS_PER_NODE="2")
    assert slurm.returncode == 0, slurm.stderr
    assert "# plan: stage=ett world_size=4 micro_batch=4 accumulation=2 global_batch=32" in slurm.stdout
    assert " srun --nodes=2 --ntasks=2 " in slurm.stdout


def run_sbatch(tmp_path, train_rc):
    """launchers/slurm.sbatch as SLURM runs it, with a stand-in train.sh that exits `train_rc` and a fake scontrol."""
    repo = tmp_path / "repo"
    (repo / "launchers").mkdir(parents=True)
    (repo / "launchers" / "train.sh").write_text(f'echo "train.sh $*"; exit {train_rc}\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ETT_REPO": str(repo), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    proc = subprocess.run(["bash", str(REPO / "launchers" / "slurm.sbatch"), "tiny", "a=1"], env=env,
                          capture_output=True, text=True, timeout=30)
    log = tmp_path / "scontrol.log"
    return proc, (log.read_text() if log.is_file() else "")


def test_sbatch_requeues_on_exit_75_only(tmp_path):
    proc, calls = run_sbatch(tmp_path / "a", 75)
    assert proc.returncode == 0 and calls == "requeue 4242\n", proc.stdout + proc.stderr
    assert "train.sh tiny a=1" in proc.stdout
    for rc in (0, 2):
        proc, calls = run_sbatch(tmp_path / f"rc{rc}", rc)
        assert proc.returncode == rc and calls == ""

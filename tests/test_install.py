"""A non-editable install works on its own: `pip install .` copies every file a run reads (recipes, DeepSpeed
templates, data_tools assets), so the tiny recipe's stage ett trains from another directory with no checkout in
sight."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import SHRINK, build_demo, run_group, subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_dot_then_two_ett_steps_from_another_directory(tmp_path):
    site, src = tmp_path / "site", tmp_path / "src"
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "data", "runs", "build",
                                                             "*.egg-info", "__pycache__", "bench", "experiments"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(site), str(src)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (site / "ds_configs").glob("*.json")) == ["zero2.json", "zero3.json",
                                                                           "zero3_offload.json"]
    demo = build_demo(tmp_path / "demo", num_train=16, num_heldout=8, per_shard=8)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH is the installed copy only: the checkout's ett_ds, ds_configs and data_tools are out of reach
    env = subprocess_env(DS_ACCELERATOR="cpu", PYTHONPATH=str(site))
    probe = subprocess.run([sys.executable, "-c", "import ett_ds, ds_configs; print(ett_ds.__file__, "
                            "ds_configs.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert probe.returncode == 0 and str(REPO) not in probe.stdout and str(site) in probe.stdout, probe
    rc, out, err = run_group([sys.executable, "-m", "ett_ds.train", "--config", "tiny", "stage=ett",
                              "train.max_steps=2", f"out_dir={elsewhere / 'runs'}", f"data.train={demo}/train",
                              f"model.llm.text_tokenizer={demo}/spm.model", *SHRINK, "data.num_workers=0",
                              "data.shuffle_buffer=8", "train.eval_every=0"], 300, cwd=elsewhere, env=env)
    assert rc == 0, err[-3000:]
    assert '"step": 2' in out

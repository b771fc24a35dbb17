"""`launchers/train.sh` with the real `deepspeed` launcher: 2 CPU processes run 3 training steps for real."""
import json
import os
import sys
from pathlib import Path

import pytest

from tests.tiny import build_demo, run_group, subprocess_env

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

REPO = Path(__file__).resolve().parents[1]


def test_deepspeed_launcher_two_processes_three_steps(tmp_path):
    demo = build_demo(tmp_path / "demo", 64, 8, 16)
    env = subprocess_env(ETT_NO_SETUP="1", ETT_NUM_PROCS="2",
                         PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["bash", str(REPO / "launchers" / "train.sh"), "tiny", f"out_dir={tmp_path}", "name=ds2",
           f"data.train={demo}/train", f"model.llm.text_tokenizer={demo}/spm.model", "data.demo_dir=null",
           "data.image_size=[16,32]", "model.tokenizer.attn_resolutions=[4]", "train.micro_batch_size=2",
           "train.max_steps=3", "train.log_every=1", "data.num_workers=0", "stage=ett"]
    rc, out, err = run_group(cmd, 300, cwd=tmp_path, env=env)
    out = out + err
    assert rc == 0, out[-4000:]
    assert "deepspeed --num_gpus 2" in out
    rows = [json.loads(x) for x in (tmp_path / "ds2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    ds = json.loads((tmp_path / "ds2" / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4  # 2 per rank x 2 ranks: both processes joined one job

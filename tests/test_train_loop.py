"""The training entry point end to end on shards built by data_tools: logging, checkpoints, exact resume, 2 ranks."""
import json
import sys
from pathlib import Path

import pytest

from ett_ds.train import main
from tests.tiny import build_demo, demo_train_args, run_group, subprocess_env

pytestmark = pytest.mark.slow  # trainings, DeepSpeed engines or subprocess runs: the full suite only

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 120, 24, 30)


def args(demo, out, *extra):
    return demo_train_args(demo, out, "train.log_every=1", "loss.gan_start_step=2", *extra)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shards_feed_training_and_the_run_folder_has_everything(demo, tmp_path):
    assert main(args(demo, tmp_path, "name=r", "stage=ett", "train.max_steps=3", "train.save_every=2",
                     "train.image_every=3")) == 0
    run = tmp_path / "r"
    for f in ("config.yaml", "ds_config.json", "metrics.jsonl"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    assert (run / "checkpoints" / "step_00000003" / "complete").is_file()
    assert list((run / "images").glob("recon_step00000003.png"))
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3]
    for key in ("loss", "loss_cap", "loss_vq", "lr", "samples_per_s", "tokens_per_s", "codebook_usage"):
        assert r[-1][key] is not None and r[-1][key] >= 0 or key == "loss_vq", key
    assert r[-1]["data"]["ok"] > 0
    assert "auto" not in (run / "ds_config.json").read_text().replace("autocast", "")


def test_save_stop_resume_reproduces_the_uninterrupted_trajectory(demo, tmp_path):
    common = ["stage=ett", "train.max_steps=4", "train.save_every=2", "data.num_workers=1"]
    assert main(args(demo, tmp_path, "name=full", *common)) == 0
    assert main(args(demo, tmp_path, "name=cut", *common, "train.stop_at=2")) == 0
    assert [x["step"] for x in rows(tmp_path / "cut")] == [1, 2]
    assert main(args(demo, tmp_path, "name=cut", *common)) == 0  # resume=auto from step 2
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [x["step"] for x in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        for key in ("loss", "loss_cap", "loss_vq", "loss_d", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_a_checkpoint_whose_world_size_does_not_match_its_shards_is_refused(demo, tmp_path, capsys):
    """Another world size is resumed through a universal checkpoint (tests/test_cluster_resume.py); a folder whose
    trainer_state names another number of ranks than it holds shards of is refused in one line."""
    assert main(args(demo, tmp_path, "name=w", "stage=align", "train.max_steps=1")) == 0
    state = tmp_path / "w" / "checkpoints" / "step_00000001" / "trainer_state.json"
    s = json.loads(state.read_text())
    state.write_text(json.dumps({**s, "world_size": 8}))
    capsys.readouterr()
    assert main(args(demo, tmp_path, "name=w", "stage=align", "train.max_steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names 8 data-parallel ranks but the folder holds ZeRO shards of 1" in err[0]


def test_two_ranks_torchrun_decoder_stays_fp32_and_training_runs(demo, tmp_path):
    script = REPO / "tests" / "scripts" / "two_rank_fp32.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args(demo, tmp_path, "name=tr", "stage=ett", "engine.precision=autocast_bf16")[2:]]
    rc, out, err = run_group(cmd, 240, cwd=REPO, env=subprocess_env())
    assert rc == 0, (out + err)[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "tr").glob("result_rank*.json"))]
    assert len(results) == 2 and {r["rank"] for r in results} == {0, 1}
    for r in results:
        assert r["decoder_weight_dtype"] == "torch.float32" and r["decoder_out_dtype"] == "torch.float32"
        assert r["decoder_weight_not_bf16_rounded"], "decoder weights were all-gathered in bf16"
        assert r["llm_out_dtype"] == "torch.bfloat16"
        assert r["world_size"] == 2 and r["losses_finite"]

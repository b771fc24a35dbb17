"""The dry run (and ett_ds.train, before anything is built) checks every local path the run will read and names each
one that is missing; URLs, `pipe:` shards and the demo data a run builds itself are left alone (issue 21, item 11)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ett_ds.config import load_config
from ett_ds.preflight import missing_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def present(tmp_path):
    """Every kind of input the run reads, present: shards, an LLM folder, a text tokenizer, a complete step folder,
    a tokenizer checkpoint and its YAML, VGG weights, a DeepSpeed JSON."""
    for d in ("train", "heldout"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x-000000.tar").write_bytes(b"")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "complete").write_text("")
    for f in ("spm.model", "tok.ckpt", "tok.yaml", "vgg.pth"):
        (tmp_path / f).write_bytes(b"x")
    (tmp_path / "ds.json").write_text("{}")
    return {"data.train": f"{tmp_path}/train", "data.eval": f"{tmp_path}/heldout", "train.eval_every": "5",
            "model.llm.path": f"{tmp_path}/llm", "model.llm.init_config": "null",
            "model.llm.text_tokenizer": f"{tmp_path}/spm.model", "train.init_from": str(step),
            "train.resume": str(step), "model.tokenizer.checkpoint": f"{tmp_path}/tok.ckpt",
            "model.tokenizer.checkpoint_config": f"{tmp_path}/tok.yaml",
            "loss.perceptual_weights": f"{tmp_path}/vgg.pth", "engine.ds_config": f"{tmp_path}/ds.json",
            "data.demo_dir": "null"}


def cfg_with(values: dict, **changed):
    values = {**values, **{k.replace("__", "."): v for k, v in changed.items()}}
    return load_config("tiny", [f"{k}={v}" for k, v in values.items()])


def test_every_input_present_passes(present):
    assert missing_inputs(cfg_with(present)) == []


@pytest.mark.parametrize("key,broken,message", [
    ("model.llm.path", "/models/Qwen2.5-1.5B", "does not exist"),
    ("model.llm.path", "{tmp}/train", "has no config.json"),
    ("model.llm.text_tokenizer", "{tmp}/nope.model", "does not exist"),
    ("data.train", "/nonexistent", "shard(s) not found: /nonexistent"),
    ("data.train", "{tmp}/train::{tmp}/more-{{000..003}}.tar", "not found: {tmp}/more-000.tar (and 3 more)"),
    ("data.eval", "{tmp}/no_heldout", "not found"),
    ("train.init_from", "{tmp}/no_run/step_00000010", "does not exist"),
    ("train.init_from", "{tmp}/llm", "neither a complete checkpoint step folder"),
    ("train.resume", "{tmp}/run/checkpoints/step_00000099", "does not exist"),
    ("model.tokenizer.checkpoint", "{tmp}/ibq.ckpt", "does not exist"),
    ("model.tokenizer.checkpoint_config", "{tmp}/ibq.yaml", "does not exist"),
    ("loss.perceptual_weights", "{tmp}/vgg16.pth", "does not exist"),
    ("engine.ds_config", "{tmp}/mine.json", "does not exist"),
])
def test_each_missing_path_kind_is_named(present, tmp_path, key, broken, message):
    broken, message = broken.format(tmp=tmp_path), message.format(tmp=tmp_path)
    missing = missing_inputs(cfg_with(present, **{key.replace(".", "__"): broken}))
    assert len(missing) == 1 and missing[0].startswith(f"{key}: ") and message in missing[0], missing


def test_paths_a_stage_does_not_read_are_not_checked(present, tmp_path):
    # stage tokenizer has no LLM; align does not reconstruct (no VGG); eval shards only with eval_every
    cfg = cfg_with(present, stage="tokenizer", model__llm__path="/gone", model__llm__text_tokenizer="/gone.model")
    assert missing_inputs(cfg) == []
    assert missing_inputs(cfg_with(present, stage="align", loss__perceptual_weights="/gone.pth")) == []
    assert missing_inputs(cfg_with(present, train__eval_every="0", data__eval="/gone")) == []


def test_urls_and_pipes_are_left_alone(present):
    cfg = cfg_with(present, data__train="pipe:cat /nonexistent/x-{000..009}.tar::https://example.invalid/y.tar",
                   data__eval="s3://bucket/heldout-{000..001}.tar")
    assert missing_inputs(cfg) == []


def test_demo_data_not_built_yet_is_not_missing_but_a_typo_beside_built_demo_data_is(present, tmp_path):
    demo = tmp_path / "demo"
    cfg = cfg_with(present, data__demo_dir=str(demo), data__train=f"{demo}/train", data__eval=f"{demo}/heldout",
                   model__llm__text_tokenizer=f"{demo}/spm.model")
    assert missing_inputs(cfg) == []  # the run builds them first
    demo.mkdir()
    (demo / "demo_manifest.json").write_text(json.dumps({}))
    (demo / "spm.model").write_bytes(b"x")
    missing = missing_inputs(cfg)
    assert [m.split(":")[0] for m in missing] == ["data.train", "data.eval"] and "never rebuilt" in missing[0]


def test_several_missing_are_one_line_naming_each(present):
    from ett_ds.preflight import check_inputs
    with pytest.raises(FileNotFoundError) as e:
        check_inputs(cfg_with(present, model__llm__path="/models/Qwen2.5-1.5B", data__train="/nonexistent"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("missing inputs: ")
    assert "model.llm.path: /models/Qwen2.5-1.5B" in msg and "data.train: shard(s) not found: /nonexistent" in msg


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_"))}
    env.update(ETT_NO_SETUP="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HOME=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin")
    return env


@pytest.mark.slow
def test_dry_run_and_trainer_refuse_the_issues_paths_before_anything_runs(tmp_path):
    """The issue's two examples through `train.sh --dry-run` and `python -m ett_ds.train`: exit 2, one line naming
    both, nothing written; the tiny recipe from a fresh folder (its demo data not built yet) still passes."""
    work = tmp_path / "work"
    work.mkdir()
    bad = ["model.llm.path=/models/Qwen2.5-1.5B", "model.llm.init_config=null", "data.train=/nonexistent",
           f"out_dir={work}/runs"]
    dry = subprocess.run(["bash", str(REPO / "launchers" / "train.sh"), "tiny", *bad, "--dry-run"], cwd=work,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    err = [line for line in dry.stderr.splitlines() if "error" in line]
    assert dry.returncode == 2 and len(err) == 1, dry.stderr
    assert "model.llm.path: /models/Qwen2.5-1.5B does not exist" in err[0] and "/nonexistent" in err[0]
    assert "+ deepspeed" not in dry.stdout
    run = subprocess.run([sys.executable, "-m", "ett_ds.train", "--config", "tiny", *bad], cwd=work,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [f"error: {err[0].split('error: ', 1)[1]}"]
    assert list(work.iterdir()) == []
    ok = subprocess.run(["bash", str(REPO / "launchers" / "train.sh"), "tiny", "--dry-run"], cwd=work,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "+ deepspeed" in ok.stdout, ok.stderr
    assert list(work.iterdir()) == []


def test_init_from_takes_a_run_folder_as_its_newest_complete_step(present, tmp_path, capsys):
    """issue 22: every --ckpt accepts a run folder, and so does train.init_from; it is pinned to one step folder before
    any rank loads, so config.yaml records the step that was read."""
    from ett_ds.preflight import pin_init_from
    run = tmp_path / "run"
    newer = run / "checkpoints" / "step_00000020"
    newer.mkdir()
    (newer / "complete").write_text("")
    (run / "checkpoints" / "step_00000030").mkdir()  # a save that never completed: not a candidate
    for given, want in ((run, newer), (run / "checkpoints", newer), (run / "checkpoints" / "step_00000010",
                                                                     run / "checkpoints" / "step_00000010")):
        cfg = cfg_with(present, train__init_from=str(given))
        assert missing_inputs(cfg) == []
        pin_init_from(cfg)
        assert cfg.train.init_from == str(want)
    assert f"train.init_from {run / 'checkpoints'}: its newest complete step, {newer}" in capsys.readouterr().out

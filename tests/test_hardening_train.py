"""A run that cannot start fails with one line (exit 2) before it writes anything: the files of an existing run
folder are left as they were, and built demo data is never rebuilt over."""
import io

import pytest
from PIL import Image

from data_tools.tario import ShardTarWriter, sample_key
from ett_ds.engine import dist
from ett_ds.train import main
from tests.tiny import SHRINK

SENTINELS = {"config.yaml": "the existing run's config\n", "ds_config.json": "{\"the existing run\": true}\n"}


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 16), colour).save(out, format="PNG")
    return out.getvalue()


def shards(folder):
    folder.mkdir(parents=True)
    with ShardTarWriter(folder / "t-000000.tar") as w:
        for i in range(8):
            w.write(sample_key(0, i), {"png": png((i * 30, 0, 0)), "txt": b"a red picture"})
    return folder


def existing_run(out_dir, name="r"):
    run = out_dir / name
    run.mkdir(parents=True)
    for f, text in SENTINELS.items():
        (run / f).write_text(text)
    return run


def tokenizer_run(out_dir, *extra):
    return ["--config", "tiny", f"out_dir={out_dir}", "name=r", "stage=tokenizer", *SHRINK, "data.num_workers=0",
            "train.max_steps=1", *extra]


def one_error_line(err):
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def _one_line_errors(monkeypatch):
    dist.init_distributed()
    monkeypatch.delenv("ETT_DEBUG", raising=False)


def test_missing_training_data_leaves_the_run_folder_untouched(tmp_path, capsys):
    run = existing_run(tmp_path)
    missing = tmp_path / "no_such_shards"
    assert main(tokenizer_run(tmp_path, f"data.train={missing}")) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err)
    assert {f: (run / f).read_text() for f in SENTINELS} == SENTINELS
    assert sorted(p.name for p in run.iterdir()) == sorted(SENTINELS)


def test_missing_resume_folder_leaves_the_run_folder_untouched(tmp_path, capsys):
    run = existing_run(tmp_path)
    data = shards(tmp_path / "data")
    missing = tmp_path / "r" / "checkpoints" / "step_00000007"
    assert main(tokenizer_run(tmp_path, f"data.train={data}", f"train.resume={missing}")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train.resume" in line and str(missing) in line
    assert {f: (run / f).read_text() for f in SENTINELS} == SENTINELS
    assert sorted(p.name for p in run.iterdir()) == sorted(SENTINELS)


def test_a_failing_first_run_creates_no_run_folder(tmp_path, capsys):
    assert main(tokenizer_run(tmp_path, f"data.train={tmp_path / 'missing'}")) == 2
    one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_built_demo_data_is_never_rebuilt_when_data_train_matches_nothing(tmp_path, capsys):
    """A typo in data.train next to a finished demo folder used to rebuild it (new spm.model, maybe other fonts)."""
    demo = tmp_path / "demo"
    shards(demo / "train")
    (demo / "spm.model").write_bytes(b"the spm.model the existing checkpoints were trained with")
    (demo / "demo_manifest.json").write_text("{\"config\": {}, \"summary\": {}}")
    before = {p.relative_to(demo): p.read_bytes() for p in demo.rglob("*") if p.is_file()}
    typo = demo / "trian"
    assert main(tokenizer_run(tmp_path, f"data.demo_dir={demo}", f"data.train={typo}")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(typo) in line and str(demo) in line and "never rebuilt" in line
    assert {p.relative_to(demo): p.read_bytes() for p in demo.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_resumed_run_keeps_no_rows_of_the_killed_attempt_past_its_checkpoint(tmp_path):
    """Killed while saving step 4 (no `complete` marker) and mid-way through a line: the rerun resumes from step 2,
    and metrics.jsonl holds every step once, the rerun's rows for steps 3 and 4."""
    import json
    data = shards(tmp_path / "data")
    run_args = tokenizer_run(tmp_path, f"data.train={data}", "train.max_steps=4", "train.save_every=2",
                             "train.log_every=1", "train.image_every=0", "loss.gan_start_step=100")
    assert main(run_args) == 0
    run = tmp_path / "r"
    (run / "checkpoints" / "step_00000004" / "complete").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # the killed writer's last, half-written line
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:4]]
    assert main(run_args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first[:2]
    assert rows[2]["time"] > first[3]["time"]  # steps 3 and 4 are the rerun's

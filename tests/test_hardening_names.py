"""Issue 21 item 3: a shard file's name never runs a command or opens a URL.

Only a string the user typed may be ``pipe:CMD`` or a URL. In a shard folder given as a relative path (``.``), files
named ``pipe:touch PWNED;cat x.tar #.tar``, ``http:x.tar`` or ``gs:x.tar`` are files: every reader (training,
evaluation, the held-out check during training, ``data_tools verify``, ``data_tools instruct``) reads them as
(bad) files and counts or reports them. ``curl`` and ``gsutil`` (what webdataset's opener runs for http and gs) are
replaced by scripts that leave a marker, so a name taken for a URL shows up even without a network.
"""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.tiny import build_demo, demo_train_args, subprocess_env

REPO = Path(__file__).resolve().parents[1]
HOSTILE = ("pipe:touch PWNED;cat x.tar #.tar", "http:x.tar", "gs:x.tar")
MARKERS = ("PWNED", "CURLED", "GSUTILED")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 64, 8, 16)


@pytest.fixture
def hostile(demo, tmp_path, monkeypatch):
    """A copy of the demo's training shards plus the hostile names; the current directory is that folder (the
    readers get ``.``), and PATH starts with fake curl / gsutil that leave markers there."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in (demo / "train").iterdir():
        if f.suffix in (".tar", ".json"):
            shutil.copy(f, folder / f.name)
    for name in HOSTILE:
        (folder / name).write_bytes(b"not a tar\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, marker in (("curl", "CURLED"), ("gsutil", "GSUTILED")):
        (fake / tool).write_text(f"#!/bin/sh\ntouch '{folder}/{marker}'\nexit 22\n")
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(folder)
    return folder


def no_command_ran(folder: Path) -> None:
    ran = [m for m in MARKERS if (folder / m).exists()]
    assert not ran, f"a shard's name was run as a command or opened as a URL: {ran}"


def env_here(**extra) -> dict:
    return subprocess_env(PATH=os.environ["PATH"], **extra)


# ------------------------------------------------------------------------------------------------ the one place
@pytest.mark.parametrize("spec", [".", "*.tar", "./*.tar", "{.,.}", ["."]])
def test_listed_and_globbed_names_become_absolute_file_paths(hostile, spec):
    from ett_ds.data.decode import is_url
    from ett_ds.data.shards import expand_urls
    urls = expand_urls(spec)
    names = {Path(u).name for u in urls}
    assert set(HOSTILE) <= names, urls
    assert all(u.startswith("/") and not is_url(u) for u in urls), urls
    assert all(Path(u).parent == hostile for u in urls), urls


def test_typed_urls_stay_urls():
    """What the user typed is taken as typed: pipe: and URLs (the documented way to stream shards)."""
    from ett_ds.data.shards import expand_urls
    assert expand_urls("pipe:cat a.tar::http://host/b-{0..1}.tar") == ["pipe:cat a.tar", "http://host/b-0.tar",
                                                                      "http://host/b-1.tar"]


def test_a_file_url_is_opened_as_a_file_never_run(tmp_path, monkeypatch):
    """`file://pipe:CMD` names a file called `pipe:CMD`: it is opened (or missing), its command never runs."""
    from ett_ds.data.decode import open_shard
    monkeypatch.chdir(tmp_path)
    cmd = f"pipe:touch {tmp_path}/PWNED; cat x.tar"
    with pytest.raises(FileNotFoundError):
        open_shard("file://" + cmd)
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / cmd.replace("/", "_")).write_bytes(b"tar bytes")
    with open_shard("file://" + cmd.replace("/", "_")) as f:
        assert f.read() == b"tar bytes"
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------------ in-process readers
def make_example(sample):
    return sample["__key__"]


def collate(keys):
    return {"keys": keys}


def test_train_stream_reads_hostile_names_as_bad_files(hostile):
    from ett_ds.data.shards import train_batches
    stats = Counter()
    for i, batch in enumerate(train_batches(".", batch_size=4, make_example=make_example, collate=collate,
                                            shuffle_buffer=8)):
        stats.update(batch["data_stats"])
        if stats["unreadable_shard"] >= 3 or i > 300:
            break
    no_command_ran(hostile)
    assert stats["unreadable_shard"] >= 3 and stats["ok"] > 0, stats


def test_eval_stream_and_vqa_reader_read_hostile_names_as_bad_files(hostile):
    from ett_ds.data.eval_stream import eval_batches, eval_plan
    from ett_ds.data.shards import expand_urls
    from ett_ds.eval import vqa
    shards = sorted(expand_urls("."))
    assert sum(eval_plan(shards, 4, 1, 0)) == 64 // 4  # the hostile files count 0 samples (header scan of a file)
    stats = Counter()
    for batch in eval_batches(".", batch_size=4, make_example=make_example, collate=collate, rank=0, world_size=1):
        stats.update(batch["data_stats"])
    no_command_ran(hostile)
    assert stats["unreadable_shard"] == len(HOSTILE) and stats["ok"] == 64, stats
    vqa_stats = Counter()
    list(vqa.iter_vqa(".", vqa_stats, {}))  # the demo's training shards have no VQA json: no records, but read
    no_command_ran(hostile)
    assert vqa_stats["unreadable_shard"] == len(HOSTILE), vqa_stats


# ------------------------------------------------------------------------------------------------ data_tools
def test_data_tools_verify_reports_hostile_names_as_unreadable_files(hostile):
    r = subprocess.run([sys.executable, "-m", "data_tools", "verify", ".", "--json"], cwd=hostile, env=env_here(),
                       capture_output=True, text=True, timeout=300)
    no_command_ran(hostile)
    assert r.returncode != 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    for name in HOSTILE:
        assert any(p.startswith(f"{name}: unreadable tar") for p in report["problems"]), report["problems"]
    assert report["samples"] == 64 and report["shards"] == 4 + len(HOSTILE), report


def test_data_tools_instruct_reads_hostile_names_as_files(hostile, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_tools", "instruct", "--in", ".", "--out", str(tmp_path / "sft")],
                       cwd=hostile, env=env_here(), capture_output=True, text=True, timeout=300)
    no_command_ran(hostile)
    assert r.returncode == 2 and "unreadable tar" in r.stderr, r.stdout + r.stderr  # the first hostile file, named


# ------------------------------------------------------------------------------------------------ training, evaluate
@pytest.mark.slow
def test_training_and_evaluate_on_a_relative_folder_read_hostile_names_as_bad_files(demo, hostile, tmp_path):
    """`data.train=.` and `data.eval=.` (held-out check every step) in the hostile folder, then `evaluate --data .`
    on the checkpoint: both exit 0, nothing ran, the hostile files are counted as unreadable shards."""
    args = demo_train_args(demo, tmp_path / "runs", "name=n", "stage=tokenizer", "train.max_steps=3",
                           "train.log_every=1", "train.image_every=0", "train.eval_every=1", "train.eval_samples=8",
                           "data.num_workers=2")
    args = [a if not a.startswith(("data.train=", "data.eval=")) else a.split("=")[0] + "=." for a in args]
    r = subprocess.run([sys.executable, "-m", "ett_ds.train", *args], cwd=hostile, env=env_here(),
                       capture_output=True, text=True, timeout=600)
    no_command_ran(hostile)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    run = tmp_path / "runs" / "n"
    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / "complete").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drawn = sum((r.get("data") or {}).get("unreadable_shard", 0) for r in rows if "eval" not in r)
    assert drawn >= 1 and sum("eval" in r for r in rows) == 3, rows  # the stream drew hostile files, counted them

    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "ett_ds.evaluate", "--ckpt", str(ckpt), "--data", ".", "--tasks",
                        "recon", "--ocr", "off", "--batch-size", "8", "--num-workers", "2", "--out", str(out),
                        "--quiet"], cwd=hostile, env=env_here(), capture_output=True, text=True, timeout=600)
    no_command_ran(hostile)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    stats = json.loads(out.read_text())["data_stats"]
    assert stats.get("unreadable_shard") == len(HOSTILE) and stats.get("ok") == 64, stats

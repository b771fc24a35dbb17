"""Issue #14 item 3: a folder of img2dataset output trains, evaluates and verifies as it is.

The fixture is laid out as img2dataset's webdataset writer leaves it: ``00000.tar`` holding ``KEY.jpg``, ``KEY.txt``
and ``KEY.json`` (caption, url, key, status, ...) with 9-digit keys (shard id x 10^4 + index), ``00000.parquet``
with one row per input (failed rows included, with their error) and ``00000_stats.json``; no sizes.json.
"""
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from data_tools.cli import main as data_tools
from ett_ds.data.eval_stream import shard_counts
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args


def _jpeg(text: str) -> bytes:
    img = Image.new("RGB", (64, 32), (235, 230, 220))
    ImageDraw.Draw(img).text((4, 10), text, fill=(20, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_img2dataset_shard(folder, shard_id: int, n: int, failed: int) -> None:
    rows, members = [], []
    for i in range(n + failed):
        key = f"{shard_id * 10_000 + i:09d}"
        ok = i < n
        caption = f"{(shard_id * 37 + i * 13) % 900 + 10}"
        meta = {"url": f"http://example.invalid/{key}.jpg", "caption": caption, "key": key,
                "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP 404", "width": 64 if ok else None,
                "height": 32 if ok else None, "original_width": 64 if ok else None,
                "original_height": 32 if ok else None, "exif": None, "sha256": None}
        rows.append(meta)
        if ok:  # img2dataset writes only successful samples into the tar
            members += [(f"{key}.jpg", _jpeg(caption)), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
    name = f"{shard_id:05d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    (folder / f"{name}_stats.json").write_text(json.dumps({
        "count": n + failed, "successes": n, "failed_to_download": failed, "failed_to_resize": 0,
        "duration": 1.0, "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": n, "HTTP 404": failed}}))


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img2dataset")
    write_img2dataset_shard(folder, 0, 24, 3)
    write_img2dataset_shard(folder, 1, 20, 2)
    return folder


def test_counts_and_verify_read_img2dataset_output(i2d, capsys):
    assert shard_counts([str(i2d / "00000.tar"), str(i2d / "00001.tar")]) == [24, 20]
    capsys.readouterr()
    assert data_tools(["verify", "--json", str(i2d)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 44 and report["problems"] == [] and report["counts_from"].startswith("img2dataset")
    # a stats file that disagrees with the tar is reported
    stats = json.loads((i2d / "00001_stats.json").read_text())
    (i2d / "00001_stats.json").write_text(json.dumps(stats | {"successes": 21}))
    try:
        assert data_tools(["verify", str(i2d)]) == 1
    finally:
        (i2d / "00001_stats.json").write_text(json.dumps(stats))


def test_img2dataset_folder_trains(i2d, tmp_path_factory):
    demo = build_demo(tmp_path_factory.mktemp("demo"), 16, 4, 16)  # for its spm.model only
    out = tmp_path_factory.mktemp("runs")
    assert train(demo_train_args(demo, out, "name=i", "stage=ett", "train.max_steps=2", "train.image_every=0",
                                 f"data.train={i2d}", f"data.eval={i2d}")) == 0
    assert (out / "i" / "checkpoints" / "step_00000002").is_dir()
    log = (out / "i").rglob("*.jsonl")
    rows = [json.loads(x) for f in log for x in f.read_text().splitlines() if x.startswith("{")]
    assert rows  # the run logged its steps

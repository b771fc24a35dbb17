"""Issue 21 item 8: ``data_tools llava`` reads only regular files inside ``--image-root``, up to a size cap.

Absolute paths, ``..`` paths and symlinks out of the root used to be read and copied into the shard, and
``"image": "/dev/zero"`` was read until the OOM killer stopped it. Every such row is now counted by reason and its
file never opened: every ``open`` of the run is recorded and none touches them.
"""
import builtins
import io
import json
import os
import signal
import tarfile

import pytest
from PIL import Image

from data_tools.cli import main as data_tools
from data_tools.llava import MAX_SOURCE_BYTES


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def opened(monkeypatch):
    """Every path opened (os.open, open, io.open) while the test runs, resolved."""
    seen = []
    real_os_open, real_open = os.open, builtins.open

    def rec(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(os.fsdecode(path)))

    def os_open(path, *a, **k):
        rec(path)
        return real_os_open(path, *a, **k)

    def open_(file, *a, **k):
        rec(file)
        return real_open(file, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    return seen


def test_images_outside_the_root_or_not_regular_files_are_counted_and_never_read(tmp_path, opened):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = _png((1, 2, 3))
    (outside / "secret.png").write_bytes(secret)
    (root / "a.png").write_bytes(_png((200, 0, 0)))
    (root / "inside_link.png").symlink_to(root / "a.png")  # a symlink that stays inside: fine
    (root / "out_link.png").symlink_to(outside / "secret.png")
    (root / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe.png")
    (root / "adir.png").mkdir()
    with open(root / "big.png", "wb") as f:  # sparse: one byte over the cap, no disk used
        f.truncate(MAX_SOURCE_BYTES + 1)
    rows = {"good": "a.png", "inside-link": "inside_link.png", "absolute": str(outside / "secret.png"),
            "dotdot": "../outside/secret.png", "symlink-out": "out_link.png", "dev-zero": "/dev/zero",
            "link-to-dev-zero": "zero.png", "fifo": "pipe.png", "directory": "adir.png", "over-size": "big.png"}
    (tmp_path / "rows.json").write_text(json.dumps([{"id": k, "image": v, "conversations": CONV}
                                                    for k, v in rows.items()]))
    out = tmp_path / "shards"

    def hung(*_):
        raise TimeoutError("data_tools llava blocked on a file it should not have opened")

    opened.clear()  # from here on: what the command opens
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        assert data_tools(["llava", str(tmp_path / "rows.json"), "--image-root", str(root), "--out", str(out),
                           "--no-progress"]) == 0
    finally:
        signal.alarm(0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["ok"] == 2
    assert stats["failed"] == {"outside_root": 5, "not_a_file": 2, "too_large_file": 1}
    never = {os.path.realpath(p) for p in (outside / "secret.png", "/dev/zero", root / "pipe.png",
                                           root / "adir.png", root / "big.png")}
    assert not never & set(opened), sorted(never & set(opened))
    assert os.path.realpath(root / "a.png") in opened  # the recorder does see what is read
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert tar.extractfile(m).read() != secret

"""The ett_ds input pipeline on real tar shards: exactly-once eval, reproducible resampled training, hostile data."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.tario import ShardTarWriter, sample_key
from ett_ds.data.decode import count_samples
from ett_ds.data.eval_stream import eval_batches
from ett_ds.data.shards import DataErrorRateExceeded, expand_urls, train_batches
from ett_ds.data.transforms import image_to_tensor

SIZE = (16, 16)


# --- make_example / collate: top-level so DataLoader workers can pickle them ---------------------------------------
def make_example(sample):
    return {"image": image_to_tensor(sample["image"], SIZE, train=True, rng=sample["__rng__"]),
            "key": sample["__key__"], "text": sample["text"]}


def reject_all(sample):
    return None


def collate(examples):
    return {"image": torch.stack([e["image"] for e in examples]), "key": [e["key"] for e in examples],
            "text": [e["text"] for e in examples]}


def _jpg(seed: int, size=(20, 14)) -> bytes:
    rnd = random.Random(seed)
    img = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    img.putpixel((rnd.randrange(size[0]), rnd.randrange(size[1])), (255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, sizes: list[int], sizes_json: bool = True) -> list[str]:
    """Good shards with the given sample counts; returns all keys."""
    root.mkdir(parents=True, exist_ok=True)
    keys, listing = [], {}
    for s, n in enumerate(sizes):
        with ShardTarWriter(root / f"t-{s:06d}.tar") as w:
            for i in range(n):
                key = sample_key(s, i)
                w.write(key, {"jpg": _jpg(s * 1000 + i), "txt": f"caption {key}".encode()})
                keys.append(key)
        listing[f"t-{s:06d}.tar"] = n
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps(listing))
    return keys


class Payload:
    """Unpickling this creates ``marker``: proof that a loader executed pickle data from a shard."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_hostile_shard(path: Path, marker: Path) -> None:
    good = _jpg(1)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    noisy = buf.getvalue()
    evil = pickle.dumps(Payload(str(marker)))
    with ShardTarWriter(path) as w:
        w.write("a000", {"jpg": good, "txt": b"fine"})
        w.write("a001", {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": b"corrupt"})
        w.write("a002", {"jpg": noisy[: len(noisy) * 3 // 4], "txt": b"truncated"})
        w.write("a003", {"jpg": good, "txt": b"   "})
        w.write("a004", {"txt": b"no image at all"})
        w.write("a005", {"jpg": good, "pth": evil, "pickle": evil, "txt": b"with pickles"})
        w.write("a006", {"jpg": good, "txt": b"\xff\xfe not utf8"})
        w.write("a007", {"jpg": good, "txt": b"fine too"})


# --- expand_urls --------------------------------------------------------------------------------------------------
def test_expand_urls_forms(tmp_path):
    write_shards(tmp_path / "a", [1, 1, 1])
    write_shards(tmp_path / "b", [1])
    a = tmp_path / "a"
    assert expand_urls(f"{a}/t-{{000000..000002}}.tar") == [str(a / f"t-{i:06d}.tar") for i in range(3)]
    assert len(expand_urls(f"{a}/t-000000.tar::{tmp_path / 'b'}")) == 2
    assert len(expand_urls([str(a), str(tmp_path / "b" / "t-000000.tar")])) == 4
    with pytest.raises(FileNotFoundError) as e:
        expand_urls(f"{a}/t-{{000000..000004}}.tar")
    assert "t-000003.tar" in str(e.value) and "1 more" in str(e.value) and "\n" not in str(e.value)


# --- evaluation: exactly once, equal batch counts ----------------------------------------------------------------
@pytest.mark.parametrize("world,workers,sizes_json", [(1, 1, True), (2, 2, True), (4, 2, True), (2, 2, False),
                                                      (1, 2, False)])
def test_eval_every_sample_exactly_once(tmp_path, world, workers, sizes_json):
    keys = write_shards(tmp_path, [7, 3, 9, 1, 5], sizes_json=sizes_json)
    seen, counts = Counter(), []
    for rank in range(world):
        n = 0
        for batch in eval_batches(str(tmp_path), batch_size=4, make_example=make_example, collate=collate,
                                  rank=rank, world_size=world, num_workers=workers):
            assert batch["valid"].dtype == torch.bool and len(batch["valid"]) == len(batch["key"])
            seen.update(k for k, v in zip(batch["key"], batch["valid"].tolist()) if v)
            n += 1
        counts.append(n)
    assert sorted(seen) == sorted(keys) and max(seen.values()) == 1
    assert len(set(counts)) == 1, f"unequal eval batch counts per rank: {counts}"


def test_eval_pad_partial_and_max_batches(tmp_path):
    write_shards(tmp_path, [5, 2])
    batches = list(eval_batches(str(tmp_path), batch_size=4, make_example=make_example, collate=collate,
                                rank=1, world_size=2, pad_partial=True))
    # rank 0 holds 5 samples -> 2 batches; rank 1 holds 2 -> 1 real (padded to 4 rows) + 1 all-padding batch.
    assert [b["valid"].tolist() for b in batches] == [[True, True, False, False], [False] * 4]
    assert all(b["image"].shape[0] == 4 for b in batches)
    assert len(list(eval_batches(str(tmp_path), batch_size=1, make_example=make_example, collate=collate,
                                 rank=0, world_size=1, max_batches=3))) == 3


def test_count_samples_from_headers(tmp_path):
    write_shards(tmp_path, [6])
    assert count_samples(str(tmp_path / "t-000000.tar")) == 6


# --- training: resampled, reproducible ----------------------------------------------------------------------------
def _keys(n_batches, tmp_path, **kw):
    it = train_batches(str(tmp_path), batch_size=3, make_example=make_example, collate=collate,
                       shuffle_buffer=20, **kw)
    out = [next(it) for _ in range(n_batches)]
    return [tuple(b["key"]) for b in out], out


def test_train_reproducible_and_distinct_streams(tmp_path):
    write_shards(tmp_path, [6, 6, 6, 6])
    base, batches = _keys(8, tmp_path, seed=1, segment=0, rank=0, world_size=2)
    again, batches2 = _keys(8, tmp_path, seed=1, segment=0, rank=0, world_size=2)
    assert base == again
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, batches2))  # random crops too
    assert _keys(8, tmp_path, seed=1, segment=1, rank=0, world_size=2)[0] != base
    assert _keys(8, tmp_path, seed=1, segment=0, rank=1, world_size=2)[0] != base
    assert _keys(8, tmp_path, seed=2, segment=0, rank=0, world_size=2)[0] != base
    assert sum(b["data_stats"]["ok"] for b in batches) == 24


def test_train_reproducible_with_workers(tmp_path):
    write_shards(tmp_path, [5, 5, 5])
    w2, _ = _keys(6, tmp_path, seed=3, rank=0, world_size=1, num_workers=2)
    assert w2 == _keys(6, tmp_path, seed=3, rank=0, world_size=1, num_workers=2)[0]
    assert w2 != _keys(6, tmp_path, seed=3, segment=5, rank=0, world_size=1, num_workers=2)[0]


# --- hostile and broken data -------------------------------------------------------------------------------------
def test_bad_samples_skipped_counted_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(str(probe))))  # the payload is live: unpickling it does create a file
    assert probe.exists()
    data = tmp_path / "data"
    data.mkdir()
    write_hostile_shard(data / "h-000000.tar", marker)
    write_shards(data, [4], sizes_json=False)  # t-000000.tar
    whole = (data / "t-000000.tar").read_bytes()
    with tarfile.open(data / "t-000000.tar") as tar:
        cut = tar.getmembers()[2].offset_data + 50  # inside the second sample's image
    (data / "t-000000.tar").write_bytes(whole[:cut])
    (data / "t-000001.tar").write_bytes(whole[:cut - 50 - 200])  # ends inside a member header

    totals = Counter()
    it = train_batches(str(data), batch_size=2, make_example=make_example, collate=collate, seed=0,
                       shuffle_buffer=4, max_error_rate=1.0, rank=0, world_size=1)
    texts = set()
    for _ in range(30):
        b = next(it)
        totals.update(b["data_stats"])
        texts.update(b["text"])
    for reason in ("unreadable", "truncated", "empty_caption", "missing_image", "non_utf8_caption",
                   "ignored_member", "truncated_tar"):
        assert totals[reason] > 0, (reason, totals)
    assert texts <= {"fine", "fine too", "with pickles", f"caption {sample_key(0, 0)}"}
    assert "with pickles" in texts
    assert not marker.exists()

    seen = Counter()
    for b in eval_batches(str(data / "h-000000.tar"), batch_size=8, make_example=make_example, collate=collate,
                          rank=0, world_size=1):
        seen.update(b["data_stats"])
    assert seen["ok"] == 3 and seen["ignored_member"] == 2 and seen["unreadable"] == 1 and seen["truncated"] == 1
    assert not marker.exists()


def test_error_rate_threshold(tmp_path):
    with ShardTarWriter(tmp_path / "bad-000000.tar") as w:
        for i in range(40):
            w.write(f"k{i:03d}", {"jpg": _jpg(i) if i % 2 else b"garbage", "txt": b"x"})
    kw = dict(batch_size=2, make_example=make_example, collate=collate, rank=0, world_size=1,
              min_samples_for_error_rate=20, shuffle_buffer=1)
    with pytest.raises(DataErrorRateExceeded, match="unreadable"):
        it = train_batches(str(tmp_path), max_error_rate=0.1, **kw)
        for _ in range(50):
            next(it)
    with pytest.raises(DataErrorRateExceeded):
        it = train_batches(str(tmp_path), max_error_rate=0.1, num_workers=1, **kw)
        for _ in range(50):
            next(it)
    it = train_batches(str(tmp_path), max_error_rate=0.6, **kw)
    for _ in range(50):
        next(it)
    with pytest.raises(DataErrorRateExceeded, match="rejected"):
        next(train_batches(str(tmp_path), max_error_rate=1.0, **{**kw, "make_example": reject_all}))


def test_pixel_cap_from_header(tmp_path):
    write_shards(tmp_path, [4])
    it = train_batches(str(tmp_path), batch_size=1, make_example=make_example, collate=collate, rank=0,
                       world_size=1, max_pixels=100, min_samples_for_error_rate=10)
    with pytest.raises(DataErrorRateExceeded, match="too_large"):
        next(it)


def test_missing_shards_do_not_spin(tmp_path):
    write_shards(tmp_path, [2])
    (tmp_path / "t-000000.tar").write_bytes(b"")
    with pytest.raises(DataErrorRateExceeded):
        next(train_batches(str(tmp_path), batch_size=1, make_example=make_example, collate=collate, rank=0,
                           world_size=1, min_samples_for_error_rate=10))


# --- transforms ----------------------------------------------------------------------------------------------------
def test_image_to_tensor():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    t = image_to_tensor(img, (16, 16))
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.ones(16, 16)) and torch.allclose(t[1], -torch.ones(16, 16))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.allclose(image_to_tensor(rgba, (8, 8)), torch.ones(3, 8, 8))  # transparent -> white
    stripes = Image.new("L", (64, 16))
    stripes.putdata([(x * 4) % 256 for y in range(16) for x in range(64)])
    center = image_to_tensor(stripes, (16, 16))
    crops = {hashlib.md5(image_to_tensor(stripes, (16, 16), train=True, rng=random.Random(s)).numpy().tobytes())
             .hexdigest() for s in range(5)}
    assert len(crops) > 1 and center.shape == (3, 16, 16)


def test_training_batches_carry_uint8_pixels_normalised_on_the_device():
    """The loader collates 1-byte pixels; batch_to_device turns them into exactly image_to_tensor's floats."""
    from ett_ds.config import load_config
    from ett_ds.data.batch import Batcher, batch_to_device
    cfg = load_config("tiny", ["data.image_size=[16,24]"])
    b = Batcher(cfg, None, train=False)
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 50, 3), dtype=np.uint8)) for i in range(3)]
    batch = b.collate([b.make_example({"image": im, "text": f"cap {i}", "json": None}) for i, im in enumerate(imgs)])
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (3, 3, 16, 24)
    moved = batch_to_device(batch, torch.device("cpu"))
    assert moved["pixels"].dtype == torch.float32 and moved["text"] == ["cap 0", "cap 1", "cap 2"]
    expect = torch.stack([image_to_tensor(im, (16, 24)) for im in imgs])
    assert torch.equal(moved["pixels"], expect)
    assert moved["pixels"].min() >= -1 and moved["pixels"].max() <= 1


def test_only_the_cropped_region_is_resampled():
    """Resizing just the crop's source box gives the pixels of resize-then-crop (up to rounding)."""
    from ett_ds.data.transforms import cover_size, image_to_uint8
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    nw, nh = cover_size(400, 300, (128, 128))
    full = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (nw - 128) // 2
    ref = torch.from_numpy(np.array(full.crop((left, 0, left + 128, 128)))).permute(2, 0, 1).int()
    got = image_to_uint8(img, (128, 128)).int()
    assert (got - ref).abs().max() <= 1 and (got - ref).abs().float().mean() < 0.01

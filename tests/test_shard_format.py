"""One shard format (``ett_ds.data.format``) for the writer (data_tools), the verifier and the loader: the cases where
they had drifted apart now behave the same on every side.

Real files on disk, the real CLI and the real loader; no stubs.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as data_tools
from data_tools.spm import captions_from_tar
from data_tools.tario import ShardTarWriter, sample_key
from data_tools.verify import verify_dir
from ett_ds.data.decode import decode_sample
from ett_ds.data.format import SampleError, normalize_image, sample_caption, split_name

# a 16-bit grey ramp: 0, 256, 512, ... so that scaling to 8 bits gives 0, 1, 2, ... and clipping gives 0, 255, 255
RAMP = (np.arange(64 * 64, dtype=np.uint32) % 256 * 256).astype(np.uint16).reshape(64, 64)
RAMP8 = (RAMP // 256).astype(np.uint8)


def tiff_16bit_big_endian() -> bytes:
    img = Image.frombytes("I;16B", (64, 64), RAMP.astype(">u2").tobytes())
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16B"
    return buf.getvalue()


def png(mode="RGB", size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_becomes_8bit_rgb_or_grey(mode):
    img = Image.new(mode, (5, 3))
    assert normalize_image(img).mode == "RGB"
    grey = mode in ("L", "I") or mode.startswith("I;16")
    assert normalize_image(img, keep_gray=True).mode == ("L" if grey else "RGB")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
def test_wide_grey_is_scaled_to_8_bits_not_clipped(mode):
    order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
    img = Image.frombytes(mode if mode != "I" else "I;16", (64, 64), RAMP.astype(order).tobytes())
    img = img.convert("I") if mode == "I" else img
    assert np.array_equal(np.array(normalize_image(img, keep_gray=True)), RAMP8)
    assert np.array_equal(np.array(normalize_image(img))[..., 1], RAMP8)


def test_premultiplied_alpha_is_composited_on_white():
    la = Image.new("LA", (4, 4), (0, 0)).convert("La")  # black, fully transparent
    assert normalize_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_the_writer_stores_a_16bit_big_endian_tiff_as_scaled_grey(tmp_path):
    """The writer used to clip I;16B to white (a plain RGB conversion); it now scales it like the loader does."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "ramp.tif").write_bytes(tiff_16bit_big_endian())
    (src / "ramp.txt").write_text("a grey ramp")
    out = tmp_path / "out"
    assert data_tools(["shard", str(src), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "stats.json").read_text())["ok"] == 1
    with tarfile.open(out / "data-000000.tar") as tar:
        members = {split_name(m.name)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    stored = Image.open(io.BytesIO(members["png"]))
    assert stored.mode == "L" and np.array_equal(np.array(stored), RAMP8)
    sample = decode_sample({"__key__": "k", **members})
    assert np.array_equal(np.array(sample["image"])[..., 0], RAMP8)


def test_the_loader_reads_a_16bit_big_endian_image_it_used_to_crash_on():
    """An image member whose content is a 16-bit big-endian TIFF: the loader's conversion raised ValueError."""
    sample = decode_sample({"__key__": "k", "png": tiff_16bit_big_endian(), "txt": b"ramp"})
    assert sample["image"].mode == "RGB" and np.array_equal(np.array(sample["image"])[..., 2], RAMP8)


def test_caption_rule_is_the_loaders_everywhere(tmp_path, capsys):
    """txt first, else json caption/text; a non-string caption field is bad_json -- for the loader, instruct and
    train-spm alike."""
    assert sample_caption(None, {"text": "from text"}) == "from text"
    assert sample_caption("from txt", {"caption": "from json"}) == "from txt"
    with pytest.raises(SampleError, match="bad_json"):
        sample_caption(None, {"caption": 5})
    src = tmp_path / "cap"
    src.mkdir()
    with ShardTarWriter(src / "data-000000.tar") as w:
        w.write(sample_key(0, 0), {"png": png(), "txt": b"from txt", "json": b'{"caption": "from json"}'})
        w.write(sample_key(0, 1), {"png": png(), "json": b'{"text": "only a text field"}'})
        w.write(sample_key(0, 2), {"png": png(), "txt": b"caf\xe9", "json": b'{"caption": "fine"}'})
        w.write(sample_key(0, 3), {"png": png(), "json": b'{"caption": 5}'})
    assert list(captions_from_tar(src / "data-000000.tar")) == ["from txt", "only a text field", "caf\ufffd"]
    out = tmp_path / "sft"
    capsys.readouterr()
    assert data_tools(["instruct", "--in", str(src), "--out", str(out)]) == 0
    # instruct used to prefer the json caption and to keep the other two; it now drops them for the loader's reasons
    assert json.loads(capsys.readouterr().out) == {"shards": 1, "ok": 2, "non_utf8_caption": 1, "bad_json": 1}
    with tarfile.open(out / "data-000000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert [m["caption"] for m in metas] == ["from txt", "only a text field"]


def test_verify_reports_json_that_the_loader_rejects(tmp_path):
    with ShardTarWriter(tmp_path / "data-000000.tar") as w:
        w.write(sample_key(0, 0), {"png": png(), "txt": b"x", "json": b"[1, 2]"})
    (tmp_path / "sizes.json").write_text(json.dumps({"data-000000.tar": 1}))
    with pytest.raises(SampleError, match="bad_json"):
        decode_sample({"__key__": "k", "png": png(), "json": b"[1, 2]"})
    assert verify_dir(tmp_path)["problems"] == ["data-000000.tar: 000000000000.json: not a JSON object"]


def test_writer_and_instruct_share_the_key_rule(tmp_path):
    with ShardTarWriter(tmp_path / "x.tar") as w:
        for bad in ("a.b", "a/b", ""):
            with pytest.raises(ValueError, match="sample key"):
                w.write(bad, {"txt": b"x"})


def test_max_pixels_is_the_one_limit_when_reading_as_when_writing(monkeypatch):
    """Pillow refuses images above twice its own limit as bombs; the writer raised that limit to --max-pixels, the
    loader did not, so it dropped as too_large images the writer had accepted. Both now open them the same way."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = png(size=(100, 60))  # 6000 pixels: a "bomb" to Pillow's lowered limit, not to max_pixels
    from data_tools.shard import EncodeOptions, encode_image
    assert encode_image(big, EncodeOptions(max_pixels=10_000))[2] == (100, 60)
    assert decode_sample({"__key__": "k", "png": big, "txt": b"x"}, max_pixels=10_000)["image"].size == (100, 60)
    with pytest.raises(SampleError, match="too_large"):
        decode_sample({"__key__": "k", "png": big, "txt": b"x"}, max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored

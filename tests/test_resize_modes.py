"""data.resize_mode: how an image of another aspect ratio is fitted to the training size (crop | pad | stretch),
the same in the training loader, evaluate and infer; the once-per-process aspect-ratio warning."""
import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ett_ds.config import ConfigError, load_config
from ett_ds.data.decode import decode_pil, decode_sample
from ett_ds.data.transforms import (
    PAD_FILL,
    cover_size,
    fit_image,
    image_to_tensor,
    image_to_uint8,
    reset_aspect_warning,
    to_rgb,
)

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def bands(w: int, h: int, horizontal: bool = True) -> Image.Image:
    """Three equal bands red / green / blue: top to bottom (``horizontal``) or left to right."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    n = h if horizontal else w
    for i, c in enumerate((RED, GREEN, BLUE)):
        sl = slice(i * n // 3, (i + 1) * n // 3)
        if horizontal:
            arr[sl] = c
        else:
            arr[:, sl] = c
    return Image.fromarray(arr)


def px(t: torch.Tensor) -> np.ndarray:
    """uint8 [3, H, W] -> int [H, W, 3]."""
    return t.permute(1, 2, 0).numpy().astype(int)


def near(a: np.ndarray, colour, tol: int = 12) -> np.ndarray:
    return (np.abs(a - np.array(colour)) <= tol).all(axis=-1)


# --- the three modes on a square image fitted to a 4:1 strip ---------------------------------------------------------
SQUARE, STRIP = bands(96, 96), (16, 64)  # (H, W) of the training size


def test_crop_keeps_the_centre_and_cuts_the_rest_off():
    out = px(image_to_uint8(SQUARE, STRIP, mode="crop"))
    assert out.shape == (16, 64, 3)
    assert near(out, GREEN).all()  # only the middle band survives; the red top and blue bottom are gone
    assert not near(out, RED).any() and not near(out, BLUE).any()


def test_pad_keeps_the_whole_image_between_borders_of_the_fill_colour():
    out = px(image_to_uint8(SQUARE, STRIP, mode="pad"))
    assert out.shape == (16, 64, 3)
    # the 96x96 square shrinks to 16x16 and sits in the middle: 24 fill columns on each side, exactly
    assert (out[:, :24] == PAD_FILL).all() and (out[:, 40:] == PAD_FILL).all()
    inner = out[:, 24:40]
    assert not (inner == PAD_FILL).all(axis=-1).any()
    assert near(inner[1], RED).all() and near(inner[8], GREEN).all() and near(inner[14], BLUE).all()


def test_pad_puts_the_borders_above_and_below_a_wide_image():
    wide = bands(128, 32, horizontal=False)  # red | green | blue, 4:1, fitted into a square
    out = px(image_to_uint8(wide, (32, 32), mode="pad"))
    assert (out[:12] == PAD_FILL).all() and (out[20:] == PAD_FILL).all()  # 32x8 content in rows 12..19
    inner = out[12:20]
    assert near(inner[:, 2], RED).all() and near(inner[:, 16], GREEN).all() and near(inner[:, 29], BLUE).all()


def test_stretch_covers_the_whole_output_with_the_whole_image():
    out = px(image_to_uint8(SQUARE, STRIP, mode="stretch"))
    assert out.shape == (16, 64, 3)
    assert not (out == PAD_FILL).all(axis=-1).any()
    # every band keeps its third of the height, across the full width
    assert near(out[1], RED).all() and near(out[8], GREEN).all() and near(out[14], BLUE).all()


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_every_mode_is_the_identity_on_an_image_of_the_training_size(mode):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 64, 3), dtype=np.uint8))
    assert np.array_equal(px(image_to_uint8(img, STRIP, mode=mode)), np.asarray(img).astype(int))


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_pad_and_stretch_ignore_the_training_rng(mode):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    outs = {image_to_uint8(img, (32, 32), train=True, rng=random.Random(s), mode=mode).numpy().tobytes()
            for s in range(4)}
    assert len(outs) == 1


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="resize mode 'zoom'"):
        fit_image(SQUARE, STRIP, mode="zoom")


# --- crop is exactly the pipeline that existed before resize_mode ----------------------------------------------------
def _crop_before_resize_mode(img, size, train=False, rng=None):
    """image_to_uint8 as it was before data.resize_mode existed (verbatim), the reference for `crop`."""
    img = to_rgb(img)
    H, W = size
    nw, nh = cover_size(img.width, img.height, size)
    if train and rng is not None:
        left, top = rng.randint(0, nw - W), rng.randint(0, nh - H)
    else:
        left, top = (nw - W) // 2, (nh - H) // 2
    if (nw, nh) != img.size:
        sx, sy = img.width / nw, img.height / nh
        box = (left * sx, top * sy, (left + W) * sx, (top + H) * sy)
        img = img.resize((W, H), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    elif (left, top, nw, nh) != (0, 0, W, H):
        img = img.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _jpeg(w, h, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_crop_is_bit_identical_to_the_pipeline_before_resize_mode():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in ((400, 300), (300, 400), (256, 256), (128, 32), (33, 17), (1000, 90))]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 70, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8), "L"))
    # and a JPEG decoded on the fast path (reduced DCT scale) as the training loader does
    images.append(decode_sample({"__key__": "k", "jpg": _jpeg(1024, 768)}, decode_size=(32, 128))["image"])
    for img in images:
        for size in ((32, 128), (128, 128), (16, 24)):
            assert torch.equal(image_to_uint8(img, size), _crop_before_resize_mode(img, size))
            assert torch.equal(image_to_uint8(img, size, mode="crop"), _crop_before_resize_mode(img, size))
            for seed in range(3):
                assert torch.equal(image_to_uint8(img, size, train=True, rng=random.Random(seed), mode="crop"),
                                   _crop_before_resize_mode(img, size, train=True, rng=random.Random(seed)))


def test_the_jpeg_fast_path_decodes_only_what_each_mode_needs():
    """A reduced-scale JPEG decode still covers what the mode resamples (the letterbox needs least), and fitting
    the reduced decode gives nearly the pixels of fitting the full one."""
    smooth = Image.fromarray(np.kron(np.random.default_rng(3).integers(0, 256, (8, 8, 3)), np.ones((64, 64, 1)))
                             .astype(np.uint8))  # 512x512, flat 64-px blocks
    buf = io.BytesIO()
    smooth.save(buf, "JPEG", quality=95)
    raw = {"__key__": "k", "jpg": buf.getvalue()}
    full = decode_sample(raw)["image"]
    size = (32, 128)
    need = {"crop": (128, 128), "pad": (32, 32), "stretch": (128, 32)}
    got = {}
    for mode in ("crop", "pad", "stretch"):
        img = decode_sample(raw, decode_size=size, resize_mode=mode)["image"]
        got[mode] = img.size
        assert img.width >= need[mode][0] and img.height >= need[mode][1] and img.width < 512, (mode, img.size)
        diff = (image_to_tensor(img, size, mode=mode) - image_to_tensor(full, size, mode=mode)).abs().mean()
        assert diff < 0.05, (mode, float(diff))
    assert got["pad"][0] * got["pad"][1] < got["crop"][0] * got["crop"][1]
    # a lazily opened file (lmms-eval's images) decodes as a shard's does; a decoded one is not drafted again
    for mode in ("crop", "pad", "stretch"):
        lazy = decode_pil(Image.open(io.BytesIO(buf.getvalue())), size, mode)
        assert lazy.mode == "RGB" and lazy.tobytes() == decode_sample(raw, decode_size=size, resize_mode=mode)[
            "image"].tobytes()
    loaded = Image.open(io.BytesIO(buf.getvalue()))
    loaded.load()
    assert decode_pil(loaded, size, "pad").size == (512, 512)


# --- the mode flows from the config to the loader's Batcher and to infer ---------------------------------------------
def test_the_config_key_defaults_to_crop_and_rejects_other_values():
    assert load_config("tiny").data.resize_mode == "crop"
    assert load_config("tiny", ["data.resize_mode=pad"]).data.resize_mode == "pad"
    with pytest.raises(ConfigError, match="data.resize_mode: 'zoom'"):
        load_config("tiny", ["data.resize_mode=zoom"])


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_the_batcher_fits_images_with_data_resize_mode(mode):
    from ett_ds.data.batch import Batcher
    cfg = load_config("tiny", ["data.image_size=[16,64]", f"data.resize_mode={mode}"])
    sample = {"image": SQUARE, "text": "x", "json": None}
    assert torch.equal(Batcher(cfg, None, train=False).make_example(sample)["pixels"],
                       image_to_uint8(SQUARE, STRIP, mode=mode))
    state = random.getstate()  # training draws crop offsets from the global `random`, seeded by the loader
    try:
        random.seed(5)
        got = Batcher(cfg, None, train=True).make_example(sample)["pixels"]
    finally:
        random.setstate(state)
    assert torch.equal(got, image_to_uint8(SQUARE, STRIP, train=True, rng=random.Random(5), mode=mode))


def test_infer_reads_images_with_the_resize_mode(tmp_path):
    from ett_ds.infer import read_images
    path = tmp_path / "square.png"
    SQUARE.save(path)
    for mode in ("crop", "pad", "stretch"):
        assert torch.equal(read_images([str(path)], STRIP, mode)[0], image_to_tensor(SQUARE, STRIP, mode=mode))


# --- the aspect-ratio warning ----------------------------------------------------------------------------------------
WARN_SCRIPT = """
import sys
from PIL import Image
from ett_ds.data.transforms import image_to_uint8
size = (32, 128)
for w, h in ((128, 32), (135, 32), (121, 32)):  # the training aspect, and within 10 % of it: silent
    image_to_uint8(Image.new("RGB", (w, h)), size, mode="crop")
print("MARK", file=sys.stderr, flush=True)
for mode in ("crop", "pad", "stretch"):  # off by far more than 10 %: one line, once per process
    for w, h in ((256, 256), (64, 64), (32, 128)):
        image_to_uint8(Image.new("RGB", (w, h)), size, mode=mode)
"""


def test_a_mismatched_aspect_ratio_warns_once_per_process():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", WARN_SCRIPT], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "MARK" in lines, lines
    before, after = lines[:lines.index("MARK")], lines[lines.index("MARK") + 1:]
    assert not [x for x in before if x.startswith("warning:")], before
    warnings = [x for x in after if x.startswith("warning:")]
    assert len(warnings) == 1, after
    w = warnings[0]
    assert "256x256" in w and "128x32" in w and "data.resize_mode=crop" in w and "10%" in w


def test_the_warning_can_be_rearmed_in_process(capfd):
    reset_aspect_warning()
    image_to_uint8(Image.new("RGB", (64, 64)), STRIP, mode="pad")
    image_to_uint8(Image.new("RGB", (64, 64)), STRIP, mode="pad")
    err = [x for x in capfd.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(err) == 1 and "pad adds borders" in err[0]
    reset_aspect_warning()
    image_to_uint8(Image.new("RGB", (64, 16)), STRIP, mode="stretch")  # the training aspect: nothing to say
    assert not [x for x in capfd.readouterr().err.splitlines() if x.startswith("warning:")]

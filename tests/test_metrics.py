"""Metric functions against hand-computed values; the OCR reader on rendered text (skips without RapidOCR)."""
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from ett_ds.eval import metrics as M
from ett_ds.eval import ocr


# ------------------------------------------------------------------------------------------------ PSNR / SSIM
def test_psnr_known_mse():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1                      # MSE 0.01 in [-1, 1]: 10 log10(4 / 0.01) = 26.0206 dB
    y[1, :, :2] = 0.2                # half the pixels off by 0.2: MSE 0.02 -> 10 log10(200) = 23.0103 dB
    got = M.psnr(x, y)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert got[0].item() == pytest.approx(10 * math.log10(400), abs=1e-4)
    assert got[1].item() == pytest.approx(10 * math.log10(200), abs=1e-4)
    # [0, 1] range with data_range=1: MSE 0.01 -> 20 dB
    assert M.psnr(x, x + 0.1, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_identical_is_capped():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    got = M.psnr(x, x.clone())
    assert torch.all(got == M.PSNR_CAP_DB)
    assert M.psnr(x[0], x[0]).shape == (1,)          # a single CHW image works too


def _ssim_reference(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """Wang et al. SSIM with a uniform window and sample covariance, written out to cross-check skimage."""
    from scipy.ndimage import uniform_filter
    c1, c2, n = 0.01 ** 2, 0.03 ** 2, win * win
    vals = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        ux, uy = uniform_filter(x, win), uniform_filter(y, win)
        cov = n / (n - 1)
        vx = cov * (uniform_filter(x * x, win) - ux * ux)
        vy = cov * (uniform_filter(y * y, win) - uy * uy)
        vxy = cov * (uniform_filter(x * y, win) - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        p = (win - 1) // 2
        vals.append(s[p:-p, p:-p].mean())
    return float(np.mean(vals))


def test_ssim_identical_and_degraded():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 128, generator=g) * 2 - 1
    assert torch.allclose(M.ssim(x, x.clone()), torch.ones(2), atol=1e-6)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got = M.ssim(x, y)
    assert got.shape == (2,) and torch.all(got < 0.99) and torch.all(got > 0)
    a = ((x[1] + 1) / 2).permute(1, 2, 0).double().numpy()
    b = ((y[1] + 1) / 2).permute(1, 2, 0).double().numpy()
    assert got[1].item() == pytest.approx(_ssim_reference(a, b), abs=1e-5)
    # more noise, lower SSIM
    z = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.all(M.ssim(x, z) < got)


def test_ssim_small_images_window():
    x = torch.rand(1, 3, 5, 5) * 2 - 1
    assert M.ssim(x, x).item() == pytest.approx(1.0)   # window shrinks to 5
    with pytest.raises(ValueError):
        M.ssim(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8))


# ------------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize("hyp,ref,dist", [
    ("kitten", "sitting", 3), ("", "", 0), ("abc", "", 3), ("", "abcd", 4), ("abc", "abc", 0),
    ("flaw", "lawn", 2), ("Hello tokenizer 42", "Hello tokeniser 42", 1), ("ab", "ba", 2),
])
def test_edit_distance_and_cer(hyp, ref, dist):
    assert M.edit_distance(hyp, ref) == dist
    assert M.char_error_rate(hyp, ref) == pytest.approx(dist / max(1, len(ref)))


def test_cer_values_and_corpus():
    assert M.char_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    assert M.char_error_rate("", "") == 0.0
    assert M.char_error_rate("xyz", "") == 3.0            # empty ref: divide by 1
    assert M.char_error_rate("", "abcd") == 1.0
    assert M.char_error_rate(" Hello  World ", "hello world", normalize=True) == 0.0
    # corpus: (3 + 0 + 4) / (7 + 3 + 4)
    assert M.corpus_cer(["kitten", "abc", ""], ["sitting", "abc", "abcd"]) == pytest.approx(7 / 14)
    assert M.corpus_cer([], []) == 0.0
    with pytest.raises(ValueError):
        M.corpus_cer(["a"], [])


def test_exact_match_normalisation():
    assert M.exact_match("  A  red\tCAR ", "a red car")
    assert not M.exact_match("  A  red\tCAR ", "a red car", normalize=False)
    assert not M.exact_match("a red car.", "a red car")    # punctuation is kept
    assert M.mean_exact_match(["A cat", "dog", "x"], ["a  cat", "Dog", "y"]) == pytest.approx(2 / 3)
    assert M.mean_exact_match([], []) == 0.0


def test_text_scores_are_the_pooled_exact_match_and_corpus_cer():
    hyps, refs = ["A cat", "dgo", "x"], ["a  cat", "Dog", "yy"]
    assert M.text_scores(hyps, refs) == {"exact_match": M.mean_exact_match(hyps, refs),
                                         "cer": M.corpus_cer(hyps, refs, normalize=True)}
    assert M.text_scores(hyps, refs) == {"exact_match": pytest.approx(1 / 3), "cer": pytest.approx((0 + 2 + 2) / 10)}


# ------------------------------------------------------------------------------------------------ codebook
def test_codebook_stats_known_histogram():
    # codes 0,0,1,1 of K=8: usage 2/8, uniform over 2 codes -> perplexity 2
    s = M.codebook_stats(torch.tensor([[0, 0], [1, 1]]), 8)
    assert s["usage"] == pytest.approx(0.25) and s["perplexity"] == pytest.approx(2.0) and s["used"] == 2
    # counts [2, 1, 1, 0]: p = (.5, .25, .25), H = 1.5 ln 2 -> perplexity 2^1.5
    hist = M.histogram(torch.tensor([0, 1, 2, 0]), 4)
    assert hist.tolist() == [2, 1, 1, 0] and hist.dtype == torch.int64
    s = M.stats_from_histogram(hist)
    assert s["usage"] == pytest.approx(0.75) and s["perplexity"] == pytest.approx(2 ** 1.5)
    # all codes equally used -> perplexity K; histograms from two "ranks" add up
    h = M.histogram(torch.arange(4), 4) + M.histogram(torch.arange(4), 4)
    assert M.stats_from_histogram(h)["perplexity"] == pytest.approx(4.0)
    assert M.stats_from_histogram(torch.zeros(4, dtype=torch.long)) == \
        {"usage": 0.0, "perplexity": 0.0, "used": 0, "codebook_size": 4}
    with pytest.raises(ValueError):
        M.histogram(torch.tensor([4]), 4)


# ------------------------------------------------------------------------------------------------ images out
def test_to_uint8_images():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    (img,) = M.to_uint8_images(x)
    assert img.shape == (1, 4, 3) and img.dtype == np.uint8
    assert img[0, :, 0].tolist() == [0, 128, 255, 255]      # 0.0 -> 127.5 rounds to 128 (half to even)
    assert len(M.to_uint8_images(torch.zeros(5, 3, 2, 3))) == 5


def test_save_grid_size(tmp_path):
    a, b = torch.rand(3, 3, 32, 128) * 2 - 1, torch.rand(2, 3, 32, 128) * 2 - 1
    p = M.save_grid([a, b], tmp_path / "g.png", pad=2)
    with Image.open(p) as im:
        assert im.size == (2 + 3 * (128 + 2), 2 + 2 * (32 + 2))
        # first image lands at (pad, pad) unchanged
        assert np.array_equal(np.asarray(im)[2:34, 2:130], M.to_uint8_images(a[:1])[0])
    p = M.save_grid([a, b], tmp_path / "sub" / "l.png", labels=["input", "recon"], scale=2)
    with Image.open(p) as im:
        w, h = im.size
    assert h == 2 + 2 * (64 + 2) and w > 2 + 3 * (256 + 2)
    with pytest.raises(ValueError):
        M.save_grid([a], tmp_path / "bad.png", labels=["a", "b"])


# ------------------------------------------------------------------------------------------------ OCR
def test_join_lines_reading_order():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    res = [[box(60, 2, 90, 12), "world ", 0.9], [box(0, 20, 40, 30), "second", 0.9],
           [box(0, 0, 50, 14), "Hello", 0.9], [box(45, 21, 80, 31), "line", 0.9]]
    assert ocr.join_lines(res) == "Hello world second line"
    assert ocr.join_lines(None) == ""


def test_ocr_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)   # makes the import fail
    ocr._engine.cache_clear()
    try:
        assert not ocr.available()
        with pytest.raises(ocr.OCRUnavailable, match="rapidocr-onnxruntime==1.4.4"):
            ocr.OCRReader(num_threads=1)
    finally:
        ocr._engine.cache_clear()


def _font_path():
    cands = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    try:
        import matplotlib
        cands.append(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf")
    except ImportError:
        pass
    return next((p for p in cands if p.exists()), None)


def _render(text, w, h, size, font):
    f = ImageFont.truetype(str(font), size)
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    d.text(((w - (r - l)) / 2 - l, (h - (b - t)) / 2 - t), text, fill="black", font=f)
    return np.asarray(im)


needs_ocr = pytest.mark.skipif(not ocr.available(), reason="rapidocr-onnxruntime not installed")


@needs_ocr
def test_ocr_reads_rendered_text():
    font = _font_path()
    if font is None:
        pytest.skip("no DejaVu font")
    reader = ocr.OCRReader(num_threads=1)
    ref = "Hello tokenizer 42"
    large = _render(ref, 384, 64, 28, font)
    small = _render(ref, 128, 32, 10, font)
    reader.read(large)                                   # warm-up
    t = time.perf_counter()
    got_large = reader.read(large)
    got_small = reader.read(small)
    per_image = (time.perf_counter() - t) / 2
    cer_large, cer_small = M.char_error_rate(got_large, ref), M.char_error_rate(got_small, ref)
    print(f"\nOCR large={got_large!r} cer={cer_large:.3f}  small={got_small!r} cer={cer_small:.3f}  "
          f"{per_image * 1000:.0f} ms/image")
    assert cer_large <= 0.1
    assert cer_small <= 0.3
    # a float [-1, 1] batch goes through to_uint8_images; grayscale input is accepted
    t_img = torch.from_numpy(large.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert M.char_error_rate(reader.read(M.to_uint8_images(t_img)[0]), ref) <= 0.1
    assert M.char_error_rate(reader.read(large[:, :, 0]), ref) <= 0.1
    assert reader.read(np.full((32, 128, 3), 255, np.uint8)) == ""
    with pytest.raises(TypeError):
        reader.read(large.astype(np.float32))


PAGE_TRANSCRIPT = """Region-based segmentation
Let us first determine markers of the coins and the
background. These markers are pixels that we can label
unambiguously as either object or background. Here,
the markers are found at the two extreme parts of the
histogram of grey values:
>>> markers = np.zeros_like(coins)"""


@needs_ocr
def test_ocr_page_photo_anchor():
    """skimage's photo of a book page: the one real text photo available offline (a sanity anchor, not a
    benchmark). The reader misses one line and the clipped last line, hence the loose bound."""
    data = pytest.importorskip("skimage.data")
    got = ocr.OCRReader(num_threads=1, upscale_to=384).read(data.page())
    assert got.startswith("Region-based segmentation Let us first determine markers")
    assert M.char_error_rate(got, PAGE_TRANSCRIPT, normalize=True) <= 0.3


def test_grid_captions_wrap_between_words_and_cut_only_words_wider_than_a_line():
    """Caption grids break lines at spaces ("also c alled" was a word cut mid-way); a word wider than a whole line
    is the only thing cut by character, and every line fits the cell."""
    from PIL import Image, ImageDraw, ImageFont

    from ett_ds.eval.metrics import _wrap
    draw, font = ImageDraw.Draw(Image.new("L", (1, 1))), ImageFont.load_default()
    width = int(draw.textlength("a penguin also", font=font))
    lines = _wrap("a penguin also called the emperor", draw, font, width)
    assert lines == ["a penguin also", "called the", "emperor"]
    assert all(draw.textlength(x, font=font) <= width for x in lines)
    long = _wrap("x" * 40, draw, font, width)
    assert "".join(long) == "x" * 40 and len(long) > 1
    assert all(draw.textlength(x, font=font) <= width for x in long)
    assert _wrap("one\ntwo", draw, font, width) == ["one", "two"]

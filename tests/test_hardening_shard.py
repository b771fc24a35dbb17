"""`data_tools shard` on hostile images: a decompression bomb is one skipped sample counted as `too_large`; the run
goes on, the other samples of its shard are kept, and `--max-pixels` is the one pixel limit (Pillow's own
decompression-bomb limit neither ends the run nor refuses what `--max-pixels` allows)."""
import json
import struct
import zlib

from PIL import Image

from data_tools.cli import main as data_tools
from data_tools.verify import verify_dir


def single_colour_png(path, width, height):
    """A valid 1-bit PNG of any size in a few hundred KB, written without holding the pixels in memory."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then black pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(1000, height - y)) for y in range(0, height, 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def folder_with(tmp_path, big_side):
    src = tmp_path / "in"
    src.mkdir()
    single_colour_png(src / "a_big.png", big_side, big_side)
    (src / "a_big.txt").write_text("a very large black square")
    for name, colour in (("b_red", "red"), ("c_blue", "blue")):
        Image.new("RGB", (48, 32), colour).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a {colour} rectangle")
    return src


def test_a_decompression_bomb_is_counted_too_large_and_the_shard_is_kept(tmp_path, capsys):
    src = folder_with(tmp_path, 30000)  # 900 M pixels: Pillow raises DecompressionBombError on open
    out = tmp_path / "out"
    assert data_tools(["shard", str(src), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "DecompressionBomb" not in captured.err
    stats = json.loads(captured.out)
    assert stats["ok"] == 2 and stats["failed"] == {"too_large": 1}
    assert json.loads((out / "sizes.json").read_text()) == {"data-000000.tar": 2}
    assert verify_dir(out)["problems"] == []


def test_max_pixels_is_the_one_limit(tmp_path, capsys):
    """15000x15000 (225 M pixels) is above Pillow's default bomb limit (2 x 89 M) but allowed by --max-pixels."""
    src = folder_with(tmp_path, 15000)
    limit_before = Image.MAX_IMAGE_PIXELS
    out = tmp_path / "out"
    assert data_tools(["shard", str(src), "--out", str(out), "--no-progress", "--max-pixels", "300000000"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 3
    assert data_tools(["shard", str(src), "--out", str(out), "--no-progress", "--overwrite",
                       "--max-pixels", "200000000"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["ok"] == 2 and stats["failed"] == {"too_large": 1}
    assert Image.MAX_IMAGE_PIXELS == limit_before  # Pillow's global limit is restored afterwards

"""`data_tools instruct` copies nothing unchecked: only whitelisted members, images that fully decode, keys that can
be shard keys; every dropped sample is counted by reason, and none ends the run."""
import io
import json
import pickle
import tarfile

from PIL import Image

from data_tools.cli import main as data_tools
from data_tools.verify import verify_dir


def png(colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 20), colour).save(out, format="PNG")
    return out.getvalue()


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def write_tar(path, members):
    """A tar as anyone might write it: names taken as given (keys with '/', any extension)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def caption_shards(folder):
    folder.mkdir()
    good = png()
    write_tar(folder / "data-000000.tar", [
        ("000000000000.json", json.dumps({"caption": "red fox"}).encode()), ("000000000000.png", good),
        ("sub/000000000001.png", good), ("sub/000000000001.txt", b"a key with a slash"),
        ("000000000002.png", good), ("000000000002.pth", pickle.dumps(Payload())), ("000000000002.txt", b"blue sun"),
        ("000000000003.png", good[: len(good) // 2]), ("000000000003.txt", b"cut in half"),
        ("000000000004.png", b"not an image at all"), ("000000000004.txt", b"garbage"),
        ("000000000005.json", b"[1, 2]"), ("000000000005.png", good),
        ("000000000006.txt", b"a caption without an image"),
        ("000000000000.txt", b"the key again, later"), ("000000000000.png", good),
    ])
    return folder


def members_of(tar_path):
    with tarfile.open(tar_path) as tar:
        return [m.name for m in tar.getmembers()]


def test_instruct_skips_and_counts_bad_samples_and_copies_only_checked_members(tmp_path, capsys):
    src, out = caption_shards(tmp_path / "cap"), tmp_path / "sft"
    assert data_tools(["instruct", "--in", str(src), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "unpickled!" not in captured.out + captured.err
    assert json.loads(captured.out) == {
        "shards": 1, "ok": 2, "bad_key": 1, "ignored_member": 1, "truncated": 1, "unreadable": 1, "bad_json": 1,
        "missing_image": 1, "duplicate_key": 1}
    assert members_of(out / "data-000000.tar") == [
        "000000000000.json", "000000000000.png", "000000000002.json", "000000000002.png"]
    assert json.loads((out / "sizes.json").read_text()) == {"data-000000.tar": 2}
    assert verify_dir(out)["problems"] == []


def test_instruct_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    assert data_tools(["instruct", "--in", str(tmp_path)]) == 2  # --out missing
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--out" in err, err

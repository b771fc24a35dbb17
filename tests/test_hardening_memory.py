"""Issue 21 item 7: one sample can no longer exhaust memory.

A 200 MB json member (written sparse: a tar header claiming 200 MB, then a hole) used to be read whole by every
reader (training peaked at 8.4 GB RSS, verify at 844 MB, instruct at 1.25 GB). Now the size in the tar header is
checked first: the member is passed over unread, its sample counted (``too_large_text``), and the peak RSS of each
reader, measured in a subprocess, stays within a few MB of the same reader on the same shard without it. A 5-million
character sft answer is cut at ``data.max_chat_tokens`` and costs no more than the budget to encode.
"""
import io
import json
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.tiny import SHRINK, subprocess_env, train_spm

BIG = 200 << 20  # the 200 MB caption
SLACK_MB = 40  # allowed growth of peak RSS over the same reader on the shard without the big member


def _png(seed: int) -> bytes:
    img = Image.new("RGB", (64, 32), ((seed * 40) % 256, 120, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _member(f, name: str, data: bytes | None, size: int | None = None) -> None:
    """One tar member; ``data=None`` writes a sparse hole of ``size`` zero bytes (no disk, no memory)."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    f.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    if data is not None:
        f.write(data)
    else:
        f.seek(size, 1)
    f.write(b"\0" * (-info.size % tarfile.BLOCKSIZE))


def write_shard(path: Path, n: int, big: bool, text_big: str = "json") -> Path:
    """``n`` caption samples; with ``big``, sample 1 also carries a 200 MB (sparse) ``.json``."""
    with open(path, "wb") as f:
        for i in range(n):
            key = f"{i:06d}"
            if big and i == 1 and text_big == "json":
                _member(f, f"{key}.json", None, BIG)
            _member(f, f"{key}.png", _png(i))
            _member(f, f"{key}.txt", f"the quick brown fox {i}".encode())
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return path


def peak_rss_mb(code: str, timeout: float = 300) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; (peak RSS in MB of it and its children, its stdout)."""
    wrapped = "import resource, sys\ntry:\n" + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
        finally:
            r = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            print("PEAK_KB", r, flush=True)
        """)
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout, check=False,
                          env=subprocess_env(), cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    peak = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")]
    return int(peak[-1].split()[1]) / 1024, proc.stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    (root / "big").mkdir()
    (root / "small").mkdir()
    big = write_shard(root / "big" / "data-000000.tar", 12, big=True)
    write_shard(root / "small" / "data-000000.tar", 12, big=False)
    for d in ("big", "small"):
        (root / d / "sizes.json").write_text(json.dumps({"data-000000.tar": 12 if d == "small" else 11}))
    assert big.stat().st_size > BIG and big.stat().st_blocks * 512 < 10 << 20  # sparse: 200 MB claimed, not written
    return root


def test_the_loader_passes_a_200mb_member_unread_and_counts_its_sample(shards):
    code = f"""
        from collections import Counter
        from ett_ds.data.decode import iter_tar_samples
        stats = Counter()
        keys = [s["__key__"] for s in iter_tar_samples({str(shards / '{}' / 'data-000000.tar')!r}, stats)]
        print("RESULT", len(keys), dict(stats))
    """
    big, out = peak_rss_mb(code.replace("{}", "big"))
    small, _ = peak_rss_mb(code.replace("{}", "small"))
    print(f"loader peak RSS: {big:.0f} MB with the 200 MB member, {small:.0f} MB without")
    assert "RESULT 11 {'too_large_text': 1}" in out
    assert big < small + SLACK_MB


def test_verify_reports_the_200mb_member_without_reading_it(shards):
    code = """
        from data_tools.verify import verify_dir
        r = verify_dir({!r})
        print("RESULT", r["samples"], r["problems"])
    """
    big, out = peak_rss_mb(code.format(str(shards / "big")))
    small, out_small = peak_rss_mb(code.format(str(shards / "small")))
    print(f"verify peak RSS: {big:.0f} MB with the 200 MB member, {small:.0f} MB without")
    assert "000001.json: 209715200 bytes, over the size cap (the loader skips the sample as too_large_text)" in out
    assert "RESULT 12 []" in out_small
    assert big < small + SLACK_MB


def test_instruct_drops_the_200mb_sample_unread_and_converts_the_rest(shards, tmp_path):
    code = """
        from data_tools.instruct import main
        assert main(["--in", {!r}, "--out", {!r}]) == 0
    """
    big, out = peak_rss_mb(code.format(str(shards / "big"), str(tmp_path / "big")))
    small, _ = peak_rss_mb(code.format(str(shards / "small"), str(tmp_path / "small")))
    print(f"instruct peak RSS: {big:.0f} MB with the 200 MB member, {small:.0f} MB without")
    stats = json.loads(out.strip().splitlines()[-2])
    assert stats["ok"] == 11 and stats["too_large_text"] == 1, stats
    assert json.loads((tmp_path / "big" / "sizes.json").read_text()) == {"data-000000.tar": 11}
    assert big < small + SLACK_MB


def test_an_oversize_image_member_is_skipped_unread(tmp_path):
    from ett_ds.data.decode import iter_tar_samples
    path = tmp_path / "x.tar"
    with open(path, "wb") as f:
        _member(f, "000000.png", _png(0))
        _member(f, "000001.png", None, (64 << 20) + 1)
        _member(f, "000001.txt", b"caption")
        _member(f, "000002.png", _png(2))
        f.write(b"\0" * 1024)
    stats = Counter()
    assert [s["__key__"] for s in iter_tar_samples(str(path), stats)] == ["000000", "000002"]
    assert stats == {"too_large_image": 1}


def test_a_huge_tar_long_name_header_ends_the_shard_without_reading_it(tmp_path):
    """tarfile reads a GNU long-name header's data whole; one claiming 200 MB is refused like a broken shard."""
    from ett_ds.data.decode import iter_tar_samples
    path = tmp_path / "x.tar"
    with open(path, "wb") as f:
        _member(f, "000000.png", _png(0))
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, BIG
        f.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        f.seek(BIG, 1)
        _member(f, "000001.png", _png(1))
        f.write(b"\0" * 1024)
    tracemalloc.start()
    stats = Counter()
    keys = [s["__key__"] for s in iter_tar_samples(str(path), stats)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == [] and stats == {"truncated_tar": 1}  # the sample being read is dropped, like any truncation
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MB allocated"


# ---------------------------------------------------------------------------------------------------------------
# the sft conversation: cut at data.max_chat_tokens


@pytest.fixture(scope="module")
def batcher(tmp_path_factory):
    from ett_ds.config import load_config
    from ett_ds.data.batch import Batcher
    from ett_ds.data.text import TextTokenizer
    spm = train_spm(tmp_path_factory.mktemp("spm"))
    cfg = load_config("tiny", ["stage=sft", "data.demo_dir=null", f"model.llm.text_tokenizer={spm}",
                               "data.max_chat_tokens=64"])
    return Batcher(cfg, TextTokenizer(spm), train=False)


def test_a_5_million_character_answer_is_cut_to_max_chat_tokens_without_a_giant_allocation(batcher):
    from ett_ds.data.text import IGNORE
    answer = "the quick brown fox " * 250_000  # 5,000,000 characters
    conv = [{"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "and then"}, {"from": "gpt", "value": "red"}]
    tracemalloc.start()
    ids, labels = batcher.chat_sequence(conv)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    text_tokens = len(ids) - len(batcher.image_ids())
    assert text_tokens == 64 + 1  # the budget, plus bos
    assert batcher.text.boi_id in ids and sum(t != IGNORE for t in labels) > 20  # the image kept, the answer cut
    assert batcher.text.eos_id not in labels  # cut short: the answer has no end
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MB allocated to encode a 64-token conversation"


def test_a_sample_whose_answer_falls_past_the_cut_is_skipped_as_too_long(batcher, tmp_path):
    from ett_ds.data.decode import decode_sample
    from ett_ds.data.format import SampleError
    conv = [{"from": "human", "value": "<image>\n" + "the fox " * 5000}, {"from": "gpt", "value": "red"}]
    raw = {"__key__": "k", "png": _png(0), "json": json.dumps({"conversations": conv}).encode()}
    with pytest.raises(SampleError, match="too_long"):
        batcher.make_example(decode_sample(raw))
    short = [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "red"}]
    ex = batcher.make_example(decode_sample({**raw, "json": json.dumps({"conversations": short}).encode()}))
    assert ex["labels"][-1] == batcher.text.eos_id  # within the budget nothing changes


@pytest.mark.slow
def test_training_on_a_shard_with_a_200mb_caption_keeps_peak_rss_bounded(shards, tmp_path):
    spm = train_spm(tmp_path / "spm")
    code = """
        from ett_ds.train import main
        rc = main(["--config", "tiny", "out_dir={out}", "name=m", "data.train={data}", "data.eval={eval}",
                   "model.llm.text_tokenizer={spm}", *{shrink!r}, "data.num_workers=0", "data.shuffle_buffer=8",
                   "train.max_steps=2", "train.image_every=0", "train.log_every=1"])
        assert rc == 0, rc
    """
    peaks = {}
    for d in ("big", "small"):
        peaks[d], _ = peak_rss_mb(code.format(out=tmp_path / d, data=shards / d, eval=shards / "small", spm=spm,
                                                 shrink=SHRINK), 600)
    print(f"training peak RSS: {peaks['big']:.0f} MB with the 200 MB member, {peaks['small']:.0f} MB without")
    rows = [json.loads(x) for f in (tmp_path / "big" / "m").rglob("metrics.jsonl") for x in f.read_text().splitlines()
            if x.startswith("{")]
    data = Counter()
    for r in rows:
        data.update(r.get("data") or {})
    assert data["too_large_text"] >= 1, data
    assert peaks["big"] < peaks["small"] + SLACK_MB

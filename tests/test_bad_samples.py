"""Per-sample failures in the input pipeline are skipped and counted by reason, never fatal; missing captions count
as errors where captions are needed; truncated images are `truncated`.

Real shards (data_tools' writer), the real Batcher of a tiny config, the real train/eval streams.
"""
import io
import json
from collections import Counter

import pytest
from PIL import Image

from data_tools.tario import ShardTarWriter, sample_key
from ett_ds.data.batch import Batcher
from ett_ds.data.decode import decode_sample
from ett_ds.data.eval_stream import eval_batches
from ett_ds.data.format import SampleError
from ett_ds.data.shards import DataErrorRateExceeded, train_batches
from tests.tiny import tiny_config, train_spm


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((32, 16), 40 + seed % 30).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, members_of):
    """One shard of 40 samples; ``members_of(i)`` gives sample i's members besides the image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with ShardTarWriter(path) as w:
        for i in range(40):
            w.write(sample_key(0, i), {"png": png(i), **members_of(i)})
    return str(path)


def batcher(spm_model, tmp_path, stage):
    cfg = tiny_config(spm_model, tmp_path, f"stage={stage}")
    if stage == "tokenizer":
        return Batcher(cfg, None, train=True)
    from ett_ds.data.text import TextTokenizer
    return Batcher(cfg, TextTokenizer(spm_model), train=True)


def first_batches(url, b, n, **kw):
    it = iter(train_batches(url, batch_size=4, make_example=b.make_example, collate=b.collate, num_workers=0,
                            shuffle_buffer=0, min_samples_for_error_rate=20, **kw))
    return [next(it) for _ in range(n)]


def test_malformed_conversations_are_skipped_and_counted_in_training_and_evaluation(spm_model, tmp_path):
    """`{"conversations": "oops"}` used to crash both with AttributeError in data/batch.py."""
    def members(i):
        if i % 4 == 0:
            return {"json": json.dumps({"conversations": "oops"}).encode()}
        if i % 4 == 1:
            return {"json": json.dumps({"conversations": [{"from": "alien", "value": "hi"}]}).encode()}
        return {"txt": f"caption {i}".encode()}
    url = write_shard(tmp_path / "s" / "t-000000.tar", members)
    b = batcher(spm_model, tmp_path, "sft")
    batches = first_batches(url, b, 5, max_error_rate=0.6)
    stats = sum((Counter(x["data_stats"]) for x in batches), Counter())
    assert stats["bad_conversations"] > 0 and stats["ok"] > 0, stats
    eb = Batcher(b.cfg, b.text, train=False)
    got = list(eval_batches(url, batch_size=4, make_example=eb.make_example, collate=eb.collate, rank=0,
                            world_size=1, num_workers=0))
    total = sum((Counter(x.get("data_stats") or {}) for x in got), Counter())
    assert total["bad_conversations"] == 20 and total["ok"] == 20, total


def test_any_make_example_exception_is_one_counted_sample(tmp_path):
    """Odd keys fail, the last one included: samples skipped after the last batch are still counted."""
    def members(i):
        return {"txt": f"caption {i}".encode()}
    url = write_shard(tmp_path / "s" / "t-000000.tar", members)

    got = list(eval_batches(url, batch_size=4, make_example=fails_on_odd_keys, collate=collate_keys, rank=0,
                            world_size=1, num_workers=0))
    total = {}
    for x in got:
        for k, v in (x.get("data_stats") or {}).items():
            total[k] = total.get(k, 0) + v
    assert total == {"ok": 20, "example_error:KeyError": 20}, total


def fails_on_odd_keys(sample):
    if int(sample["__key__"][-1]) % 2:
        raise KeyError("boom")
    return {"key": sample["__key__"]}


def collate_keys(examples):
    return {"key": [e["key"] for e in examples]}


def test_half_the_captions_missing_trips_the_error_rate_for_caption_stages(spm_model, tmp_path):
    url = write_shard(tmp_path / "s" / "t-000000.tar",
                      lambda i: {"txt": f"caption {i}".encode()} if i % 2 else {"json": b'{"caption": ""}'})
    with pytest.raises(DataErrorRateExceeded, match="missing_caption"):
        first_batches(url, batcher(spm_model, tmp_path, "ett"), 20, max_error_rate=0.1)
    # the tokenizer stage needs no caption: the same shards train without a single error
    batches = first_batches(url, batcher(spm_model, tmp_path, "tokenizer"), 10, max_error_rate=0.1)
    assert all(set(x["data_stats"]) <= {"ok"} for x in batches if x.get("data_stats"))


def test_truncated_file_read_counts_as_truncated():
    """Pillow words truncation "image file is truncated" or "Truncated File Read" (the latter was `unreadable`)."""
    from ett_ds.data.format import load_failure_reason
    assert load_failure_reason(OSError("Truncated File Read")) == "truncated"
    assert load_failure_reason(OSError("image file is truncated (5 bytes not processed)")) == "truncated"
    assert load_failure_reason(OSError("decoder error -2")) == "unreadable"
    data = png(3)  # and a real cut PNG through decode_sample
    with pytest.raises(SampleError) as e:
        decode_sample({"__key__": "k", "png": data[: len(data) * 3 // 4], "txt": b"x"})
    assert e.value.reason == "truncated"

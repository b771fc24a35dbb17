"""Issue #14 item 4: ``ett_ds.evaluate --tasks vqa``: the standard VQA accuracy and answer normalisation, the demo's
held-out VQA split, and the task end to end on a JSONL and on shards."""
import json

import pytest
import torch

from data_tools.cli import main as data_tools
from ett_ds.eval import vqa
from ett_ds.eval.vqa import answers_of, normalize_answer, vqa_accuracy
from ett_ds.evaluate import main as evaluate
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args


def answers_with(matches: int, right="7", wrong="8"):
    return [right] * matches + [wrong] * (10 - matches)


def test_vqa_accuracy_by_hand():
    # two matches: the 8 subsets that keep both give 2/3, the 2 that drop one give 1/3
    assert vqa_accuracy("7", answers_with(2)) == pytest.approx((8 * (2 / 3) + 2 * (1 / 3)) / 10) == \
        pytest.approx(0.6)
    # three matches: dropping a matching answer leaves 2 (2/3, 3 subsets), else 3 (1.0, 7 subsets)
    assert vqa_accuracy("7", answers_with(3)) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10) == pytest.approx(0.9)
    assert vqa_accuracy("7", answers_with(4)) == 1.0  # every subset keeps at least 3
    assert vqa_accuracy("7", answers_with(1)) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("7", answers_with(0)) == 0.0
    assert vqa_accuracy("7", answers_with(10)) == 1.0
    assert vqa_accuracy("7", ["7"]) == 1.0 and vqa_accuracy("8", ["7"]) == 0.0


def test_answers_are_normalised_before_matching():
    assert normalize_answer("  Two ") == "2"
    assert normalize_answer("The Dog.") == "dog" and normalize_answer("a cat!") == "cat"
    assert normalize_answer("Dont") == "don't" and normalize_answer("isnt it") == "isn't it"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("t-shirt") == "t shirt" and normalize_answer("yes?") == "yes"
    assert vqa_accuracy("three", answers_with(4, right="3")) == 1.0
    assert vqa_accuracy("an apple", answers_with(10, right="Apple.")) == 1.0
    assert vqa_accuracy("4", answers_with(10, right="three")) == 0.0


def test_the_answers_of_a_row():
    assert answers_of({"answers": ["a", "b"]}) == ["a", "b"] and answers_of({"answer": "a"}) == ["a"]
    assert answers_of({"answers": [{"answer": "a"}, {"answer": "b"}]}) == ["a", "b"]
    assert answers_of({"answers": "a", "answer": "b"}) == ["a"]
    for row in ({}, {"answers": []}, {"answers": [1]}, {"answer": None}, {"answers": [{"x": "a"}]}):
        assert answers_of(row) is None, row


def test_answer_all_batches_items_that_share_prompt_and_length_in_their_order(monkeypatch):
    calls = []

    def fake_answer_batch(model, text, pixels, prompt, max_new_tokens):
        assert pixels.dtype == torch.float32 and -1 <= float(pixels.min()) and float(pixels.max()) <= 1
        calls.append((prompt, max_new_tokens, pixels.shape[0]))
        return [f"{prompt}{max_new_tokens}:{int(p[0, 0, 0] * 127.5 + 127.5 + 0.5)}" for p in pixels]

    monkeypatch.setattr(vqa, "answer_batch", fake_answer_batch)
    spec = [("a", 5), ("b", 5), ("a", 5), ("a", 3), ("a", 5), ("b", 5)]
    items = [(p, torch.full((3, 2, 2), i, dtype=torch.uint8), n) for i, (p, n) in enumerate(spec)]
    out = vqa.answer_all(None, None, items, batch_size=2)
    assert out == [f"{p}{n}:{i}" for i, (p, n) in enumerate(spec)]
    assert calls == [("a", 5, 2), ("a", 5, 1), ("b", 5, 2), ("a", 3, 1)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), 24, 4, 12)


def test_demo_writes_a_heldout_vqa_split_and_its_skip_logic_still_works(demo, capsys):
    rows = [json.loads(x) for x in (demo / "heldout_vqa.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    captions = {}
    for r in rows:
        assert (demo / r["image"]).is_file() and len(r["answers"]) == 10 and len(set(r["answers"])) == 1
        captions.setdefault(r["image"], {})[r["question"]] = r["answers"][0]
    for q in captions.values():
        number = q["What number is shown?"]
        assert len(number) == 3 and q["What is the first digit?"] == number[0] and \
            q["What is the last digit?"] == number[-1]
    before = (demo / "heldout_vqa.jsonl").read_text()
    build_demo(demo, 24, 4, 12)  # same options: skipped, split kept
    assert "already built, skipped" in capsys.readouterr().out
    assert (demo / "heldout_vqa.jsonl").read_text() == before
    (demo / "heldout_vqa.jsonl").unlink()  # a folder built before the split gains it on the next (skipped) call
    build_demo(demo, 24, 4, 12)
    assert "already built, skipped" in capsys.readouterr().out
    assert (demo / "heldout_vqa.jsonl").read_text() == before


def test_evaluate_vqa_on_the_demo_jsonl_and_on_shards(demo, tmp_path_factory, capsys):
    runs = tmp_path_factory.mktemp("runs")
    assert train(demo_train_args(demo, runs, "name=s", "stage=sft", "train.max_steps=2", "train.image_every=0")) == 0
    out = tmp_path_factory.mktemp("eval")
    assert evaluate(["--ckpt", str(runs / "s"), "--data", str(demo / "heldout_vqa.jsonl"), "--tasks", "vqa",
                     "--out", str(out / "m.json"), "--batch-size", "5"]) == 0
    m = json.loads((out / "m.json").read_text())
    per_q = [json.loads(x) for x in (out / "m_vqa.jsonl").read_text().splitlines()]
    assert m["vqa"]["num_questions"] == len(per_q) == 12 and m["data_stats"] == {"ok": 12}
    assert m["vqa"]["prompt"] == "{question} Answer with a single word or number."
    for r in per_q:
        assert r["prompt"] == f"{r['question']} Answer with a single word or number."
        assert r["accuracy"] == vqa_accuracy(r["prediction"], r["answers"])
    assert m["vqa"]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in per_q) / 12)
    # the same questions as shards whose json holds question/answers: the same greedy answers
    jsonl = demo / "heldout_vqa.jsonl"
    assert data_tools(["shard", str(jsonl), "--caption-col", "question_id", "--out", str(out / "shards"),
                       "--no-progress"]) == 0
    assert evaluate(["--ckpt", str(runs / "s"), "--data", str(out / "shards"), "--tasks", "vqa",
                     "--out", str(out / "s.json")]) == 0
    shard_recs = [json.loads(x) for x in (out / "s_vqa.jsonl").read_text().splitlines()]
    assert len(shard_recs) == 12
    key = lambda r: (r["question"], r["answers"][0], r["prediction"])  # noqa: E731
    assert sorted(map(key, shard_recs)) == sorted(map(key, per_q))
    # a JSONL serves only vqa: one line, exit 2
    capsys.readouterr()
    assert evaluate(["--ckpt", str(runs / "s"), "--data", str(jsonl), "--tasks", "vqa,caption",
                     "--out", str(out / "x.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "only --tasks vqa" in err

"""Issue #22 item 2: lmms-eval scores an ETT checkpoint through ``ett_ds.eval.lmms`` (the ``ett`` model class and a
local task written from a VQA JSONL) and reports the accuracy ``ett_ds.evaluate --tasks vqa`` reports, question by
question.

lmms-eval is an optional extra (requirements-lmms.txt, installed by tests/run.sh with --no-deps). Under tests/run.sh
(``ETT_LMMS_EXTRA=installed``) a missing lmms_eval fails the test; when run.sh's pip install failed
(``ETT_LMMS_EXTRA=failed``), or outside run.sh without the extra, the tests that need it skip with the reason.
"""
import ast
import glob
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image

from ett_ds.commandline import UserError
from ett_ds.eval.lmms import LmmsError, cut_at, write_task
from ett_ds.eval.lmms import main as lmms_cli
from ett_ds.eval.vqa import valid_row, vqa_accuracy
from ett_ds.evaluate import main as evaluate
from ett_ds.train import main as train
from tests.tiny import build_demo, demo_train_args

REPO = Path(__file__).resolve().parents[1]
TORCH_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def require_lmms_eval():
    if importlib.util.find_spec("lmms_eval") is not None:
        return
    state = os.environ.get("ETT_LMMS_EXTRA")
    if state == "installed":
        pytest.fail("tests/run.sh installed requirements-lmms.txt, yet lmms_eval cannot be imported")
    if state == "failed":
        pytest.skip("tests/run.sh could not install the lmms-eval extra (requirements-lmms.txt); see its pip output")
    pytest.skip("lmms-eval is not installed: pip install --no-deps -r requirements-lmms.txt (tests/run.sh does)")


def test_ett_ds_imports_without_lmms_eval_and_writes_a_task(tmp_path):
    # the module, the task writer and evaluate import nothing from lmms_eval
    code = ("import sys, ett_ds.eval.lmms, ett_ds.evaluate; "
            "assert not [m for m in sys.modules if m.startswith('lmms_eval')], 'lmms_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    rows = [{"image": "img/a.png", "question": " How many? ", "answers": ["2"] * 10}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lmms_cli(["task", "--vqa", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "t"), "--name", "my_vqa",
                     "--prompt", "Q: {question}"]) == 0
    yaml_text = (tmp_path / "t" / "my_vqa.yaml").read_text()
    assert "task: my_vqa" in yaml_text and "dataset_path: json" in yaml_text
    assert "doc_to_visual: !function my_vqa_utils.doc_to_visual" in yaml_text
    assert f'test: "{tmp_path / "q.jsonl"}"' in yaml_text
    spec = importlib.util.spec_from_file_location("my_vqa_utils", tmp_path / "t" / "my_vqa_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.doc_to_text(rows[0]) == "Q: How many?"
    assert utils.doc_to_visual(rows[0])[0].size == (8, 8)
    assert utils.process_results(rows[0], ["two"]) == {"vqa_accuracy": 1.0}
    # one-line errors: a prompt without {question}, a missing file, a row without answers
    with pytest.raises(ValueError, match="question"):
        write_task(tmp_path / "q.jsonl", tmp_path / "t", prompt="no placeholder")
    assert lmms_cli(["task", "--vqa", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t")]) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "img/a.png", "question": "x"}) + "\n")
    with pytest.raises(ValueError, match="1 row"):
        write_task(tmp_path / "bad.jsonl", tmp_path / "t")
    assert cut_at("seven\n\nmore", ["\n\n"]) == "seven" and cut_at("seven", []) == "seven"
    assert cut_at("a. b", ".") == "a"


def _unused_imports(source: str) -> set[str]:
    tree = ast.parse(source)
    imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return imported - used


def test_the_task_keeps_evaluates_row_rules_and_imports_only_what_it_uses(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "answers": [{"answer": "2"}]})
                                      + "\n")
    write_task(tmp_path / "q.jsonl", tmp_path / "t")
    assert not _unused_imports((tmp_path / "t" / "ett_vqa_utils.py").read_text())
    # the rows evaluate skips (no_question / bad_json) are the rows the writer refuses
    rows = [{"image": "a.png", "question": " ", "answers": ["2"]}, {"image": "a.png", "question": "q?", "answers": []},
            {"image": "a.png", "question": "q?", "answers": [2]}, {"question": "q?", "answer": "2"}, ["a.png"]]
    for row in rows:
        assert not valid_row(row), row
        (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(LmmsError, match="1 row"):
            write_task(tmp_path / "bad.jsonl", tmp_path / "t")
    assert valid_row({"image": "a.png", "question": "q?", "answer": "2"})
    # bad input is a UserError: one line, exit 2; nothing else is turned into one
    assert issubclass(LmmsError, UserError) and issubclass(LmmsError, ValueError)
    capsys.readouterr()
    assert lmms_cli(["task", "--vqa", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "t"), "--name", "a-b"]) == 2
    (tmp_path / "latin1.jsonl").write_bytes(b'{"image": "a.png", "question": "caf\xe9?", "answers": ["x"]}\n')
    assert lmms_cli(["task", "--vqa", str(tmp_path / "latin1.jsonl"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("error: --name 'a-b'") and "not UTF-8" in err[1], err


def test_the_ett_model_is_registered():
    require_lmms_eval()
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    from ett_ds.eval.lmms import register
    eps = [ep.value for ep in entry_points(group="lmms_eval.models") if ep.name == "ett"]
    assert eps == ["ett_ds.eval.lmms:manifests"], "ett_ds's entry point is not installed: pip install --no-deps -e ."
    cls = get_model("ett")  # found through the entry point
    register()  # the same, by hand
    assert get_model("ett") is cls
    assert issubclass(cls, lmms) and cls.__module__ == "ett_ds.eval.lmms" and cls.is_simple


def _per_question(out: Path, stem: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"{stem}_vqa.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lmms_eval_reports_the_accuracy_evaluate_reports(tmp_path):
    require_lmms_eval()
    demo = build_demo(tmp_path / "demo", 24, 4, 12)
    runs = tmp_path / "runs"
    assert train(demo_train_args(demo, runs, "name=s", "stage=sft", "train.max_steps=2", "train.image_every=0")) == 0
    ckpt, ev = runs / "s", tmp_path / "eval"
    heldout = demo / "heldout_vqa.jsonl"

    def ett_evaluate(jsonl: Path, stem: str) -> dict:
        assert evaluate(["--ckpt", str(ckpt), "--data", str(jsonl), "--tasks", "vqa", "--out", str(ev / f"{stem}.json"),
                         "--batch-size", "3", "--quiet"]) == 0
        return json.loads((ev / f"{stem}.json").read_text())["vqa"]

    plain = ett_evaluate(heldout, "heldout")
    # a second split whose answers grade the model's own answers 0, 0.3, 0.6, 0.9 and 1.0 (a near-untrained model
    # scores 0 on the demo's), its images as JPEGs (lmms-eval's image path: a lazily opened JPEG, draft-decoded)
    rows = [json.loads(x) for x in heldout.read_text().splitlines()]
    (demo / "graded").mkdir()
    for r in rows:
        jpg = Path("graded") / Path(r["image"]).with_suffix(".jpg").name
        if not (demo / jpg).exists():
            Image.open(demo / r["image"]).convert("RGB").save(demo / jpg, quality=90)
        r["image"] = str(jpg)
    graded = demo / "graded_vqa.jsonl"
    graded.write_text("".join(json.dumps({**r, "answers": ["?"]}) + "\n" for r in rows))
    ett_evaluate(graded, "graded_0")
    preds = [r["prediction"] for r in _per_question(ev, "graded_0")]
    graded.write_text("".join(json.dumps({**r, "answers": [p] * (i % 5) + ["zzz"] * (10 - i % 5)}) + "\n"
                              for i, (r, p) in enumerate(zip(rows, preds))))
    grad = ett_evaluate(graded, "graded")
    assert grad["accuracy"] == pytest.approx(sum([0, 0.3, 0.6, 0.9, 1.0, 0, 0.3, 0.6, 0.9, 1.0, 0, 0.3]) / 12)

    # the documented commands: the task, then lmms-eval with --model ett (found through the entry point)
    tasks, out = tmp_path / "lmms_tasks", tmp_path / "lmms_out"
    assert lmms_cli(["task", "--vqa", str(heldout), "--out", str(tasks)]) == 0
    assert lmms_cli(["task", "--vqa", str(graded), "--out", str(tasks), "--name", "ett_vqa_graded"]) == 0
    # a plain single process: not the tests' in-process rank 0 of 1, whose rendezvous port this process holds
    env = {k: v for k, v in os.environ.items() if k not in TORCH_DIST_ENV}
    env = {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "ett", "--model_args", f"ckpt={ckpt}",
           "--tasks", "ett_vqa,ett_vqa_graded", "--include_path", str(tasks), "--batch_size", "3", "--device", "cpu",
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    log = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0, log
    assert "|ett_vqa " in p.stdout and "|vqa_accuracy|" in p.stdout, log
    [results] = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    results = json.loads(Path(results).read_text())["results"]
    for task, ours, stem in (("ett_vqa", plain, "heldout"), ("ett_vqa_graded", grad, "graded")):
        assert results[task]["vqa_accuracy,none"] == pytest.approx(ours["accuracy"], abs=1e-12), task
        [samples] = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        samples = sorted((json.loads(x) for x in Path(samples).read_text().splitlines()), key=lambda s: s["doc_id"])
        per_q = _per_question(ev, stem)
        assert len(samples) == len(per_q) == 12
        for s, r in zip(samples, per_q):
            assert s["input"] == r["prompt"]
            assert s["filtered_resps"] in (r["prediction"], [r["prediction"]])
            assert s["vqa_accuracy"] == r["accuracy"] == vqa_accuracy(r["prediction"], r["answers"])
    print(f"lmms-eval ett_vqa {results['ett_vqa']['vqa_accuracy,none']} = evaluate {plain['accuracy']}; "
          f"ett_vqa_graded {results['ett_vqa_graded']['vqa_accuracy,none']} = evaluate {grad['accuracy']}")

"""lmms-eval for ETT checkpoints: a model class (``--model ett``) and a local VQA task built from a VQA JSONL.

    pip install --no-deps -r requirements-lmms.txt        # the optional extra (never touches torch/transformers)
    python -m ett_ds.eval.lmms task --vqa data/demo/heldout_vqa.jsonl --out lmms_tasks/
    python -m lmms_eval --model ett --model_args ckpt=runs/smoke/sft --tasks ett_vqa --include_path lmms_tasks/ \\
        --batch_size 16 --device cpu --output_path lmms_out/ --log_samples

The model class :class:`ETT` (registered under ``ett`` through the ``lmms_eval.models`` entry point in
pyproject.toml, present once ett_ds is pip-installed; :func:`register` does it in a running process) answers
``generate_until`` requests as ``ett_ds.evaluate --tasks vqa`` answers its questions: the request's text is the
prompt (an ``sft`` checkpoint gets it as a one-turn chat, other stages after the image like a caption prompt), the
image is fitted to the checkpoint's ``data.image_size`` by its ``data.resize_mode`` (a JPEG decoded at the same
reduced scale), greedy decoding of at most ``max_new_tokens`` (the request's, else the model argument's; sampling
arguments are ignored), requests that share a prompt answered in batches of ``batch_size`` in their order. The
answer is cut at the first of the request's ``until`` strings. ``loglikelihood`` and ``generate_until_multi_round``
are not supported (NotImplementedError), nor requests with several images or none; one process (no data-parallel
ranks). Model arguments (``--model_args``): ``ckpt`` (step, run or export folder), ``max_new_tokens`` (10),
``resize_mode``, ``dtype`` (float32 | bfloat16 | float16), ``device`` (also ``--device``).

The task (``task`` subcommand) writes ``TASKDIR/NAME.yaml`` and ``TASKDIR/NAME_utils.py``: lmms-eval's ``json``
loader on the JSONL (a local file: nothing is downloaded), the image path resolved against the JSONL's folder, the
prompt ``--prompt`` (``ett_ds.evaluate``'s ``--vqa-prompt`` default), and the metric ``vqa_accuracy``: the standard VQA
accuracy of ``ett_ds/eval/vqa.py`` (the very function ``evaluate`` scores with), averaged over the questions.

lmms_eval is imported only inside this module, and only when the model class is asked for: ``ett_ds`` and the
``task`` subcommand work without it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from ..checkpoint import CheckpointError
from ..commandline import OneLineParser, UserError, run_cli
from ..data.decode import decode_pil
from ..data.transforms import RESIZE_MODES, image_to_uint8
from ..models.loading import DTYPES, load_model
from .vqa import DEFAULT_PROMPT, answer_all, valid_row

MODEL_NAME = "ett"
CLASS_PATH = "ett_ds.eval.lmms.ETT"
TASK_NAME = "ett_vqa"
METRIC = "vqa_accuracy"


class LmmsError(UserError, ValueError):
    """A bad input of the ``task`` subcommand or a bad model argument: one line, exit code 2 (a ValueError too)."""


def _one_of(names) -> str:
    """``a, b or c``: the choices of a bad argument's message."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


def manifests():
    """The ``lmms_eval.models`` entry point: ``ett`` -> :class:`ETT`."""
    from lmms_eval.models.registry_v2 import ModelManifest  # reason: the optional extra (requirements-lmms.txt)
    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Register ``ett`` in lmms-eval's model registry of this process (what the entry point does on install)."""
    from lmms_eval.models import MODEL_REGISTRY_V2  # reason: the optional extra, as above
    for m in manifests():
        MODEL_REGISTRY_V2.register_manifest(m, overwrite=True)


# -- images and answers (no lmms_eval) -----------------------------------------------------------------------------
def fit_image(image, cfg):
    """A PIL image (or a path) -> uint8 (3, H, W), as ``ett_ds.evaluate --tasks vqa`` decodes and fits its images:
    a JPEG not yet loaded decodes at the reduced scale that covers ``data.image_size``, then 8-bit RGB, then
    ``data.resize_mode``."""
    size, mode = tuple(cfg.data.image_size), cfg.data.resize_mode
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    return image_to_uint8(decode_pil(image, size, mode), size=size, mode=mode)


def cut_at(text: str, until) -> str:
    """``text`` up to the first of the stop strings ``until`` (a string or a list; empty ones ignored)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for s in stops:
        if s and s in text:
            text = text.split(s, 1)[0]
    return text


# -- the lmms-eval model class (built on first access: lmms_eval imported here only) --------------------------------
def filelock_compat() -> None:
    """lmms-eval 0.7.3's ``simple_evaluate`` patches ``filelock._api`` (filelock 3.x), which filelock 4 (this
    project's pin, and what lmms-eval's own dependencies resolve to) no longer has: every evaluation then stops with
    "No module named 'filelock._api'". The patch only guards nested ``load_dataset`` calls of remote datasets against
    a self-deadlock, so with filelock 4 it is skipped (marked done). Runs when the model is built, which
    ``simple_evaluate`` does before it applies the patch."""
    try:
        import filelock._api  # noqa: F401  # reason: a probe: has this filelock the module lmms-eval patches?
    except ImportError:
        import lmms_eval.evaluator as ev  # reason: the optional extra, as above
        if hasattr(ev, "_enable_reentrant_filelocks"):
            ev._enable_reentrant_filelocks._patched = True


def _build_model_class():
    from lmms_eval.api.model import lmms  # reason: the optional extra; the class is built on first access

    class ETT(lmms):
        """An ETT checkpoint (step, run or export folder) for lmms-eval: greedy ``generate_until`` answers, as
        ``ett_ds.evaluate --tasks vqa`` gives them (module docstring)."""
        is_simple = True

        def __init__(self, ckpt: str, batch_size: int | str = 16, device: str | None = None,
                     max_new_tokens: int | str = 10, resize_mode: str | None = None, dtype: str | None = None,
                     **kwargs) -> None:
            super().__init__()
            filelock_compat()
            kwargs.pop("max_batch_size", None)
            if kwargs:
                raise LmmsError(f"ett: unknown model argument(s) {', '.join(sorted(kwargs))}; known: ckpt, "
                                "batch_size, device, max_new_tokens, resize_mode, dtype")
            if not ckpt or not Path(ckpt).exists():
                raise LmmsError(f"ett: checkpoint not found: {ckpt!r} (--model_args ckpt=PATH)")
            self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 16
            self.max_new_tokens = int(max_new_tokens)
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if dtype and dtype not in DTYPES:
                raise LmmsError(f"ett: dtype={dtype!r}: choose {_one_of(DTYPES)}")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise LmmsError("ett: runs in one process (WORLD_SIZE > 1: no data-parallel ranks)")
            try:  # float32: what load_model builds, so the same as no cast
                loaded = load_model(ckpt, device=self.device, dtype=DTYPES[dtype] if dtype else None, require="llm")
            except CheckpointError as e:
                raise LmmsError(f"ett: {str(e).splitlines()[0]}") from None
            self.model, self.text, self.cfg = loaded.model, loaded.text, loaded.cfg
            if resize_mode:
                if resize_mode not in RESIZE_MODES:
                    raise LmmsError(f"ett: resize_mode={resize_mode!r}: choose {_one_of(RESIZE_MODES)}")
                self.cfg.data.resize_mode = resize_mode

        def generate_until(self, requests) -> list[str]:
            items, untils = [], []
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                gen_kwargs = dict(gen_kwargs or {})
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
                if len(visuals) != 1:
                    raise LmmsError(f"ett: a request needs exactly one image, {task} doc {doc_id} has "
                                    f"{len(visuals)} (several images and text-only requests are not supported)")
                n = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
                items.append((context, fit_image(visuals[0], self.cfg), n))
                untils.append(gen_kwargs.get("until"))
            answers = answer_all(self.model, self.text, items, self.batch_size_per_gpu)
            out = []
            for req, ans, until in zip(requests, answers, untils):
                ans = cut_at(ans, until)
                self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), ans)
                out.append(ans)
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("ett: loglikelihood is not supported (generate_until tasks only)")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("ett: generate_until_multi_round is not supported (generate_until tasks only)")

    ETT.__module__ = __name__
    return ETT


def __getattr__(name: str):
    if name == "ETT":
        cls = globals()["ETT"] = _build_model_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the local task ------------------------------------------------------------------------------------------------
_UTILS = '''"""lmms-eval task {name}: VQA questions of {jsonl}, written by python -m ett_ds.eval.lmms task."""
from pathlib import Path

from PIL import Image

from ett_ds.eval.vqa import answers_of, vqa_accuracy

IMAGE_ROOT = Path({root!r})
PROMPT = {prompt!r}


def doc_to_visual(doc):
    return [Image.open(IMAGE_ROOT / doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return PROMPT.format(question=doc["question"].strip())


def doc_to_target(doc):
    return answers_of(doc)[0]


def process_results(doc, results):
    pred = results[0] if results else ""
    return {{"{metric}": vqa_accuracy(pred, answers_of(doc))}}
'''


def write_task(jsonl: str | Path, out: str | Path, name: str = TASK_NAME, prompt: str | None = None,
               max_new_tokens: int = 10) -> Path:
    """Write the lmms-eval task ``name`` for a VQA JSONL into the folder ``out``; returns the YAML's path."""
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if "{question}" not in prompt:
        raise LmmsError("--prompt must contain {question}")
    if not name.isidentifier():
        raise LmmsError(f"--name {name!r}: letters, digits and _ only")
    jsonl = Path(jsonl).resolve()
    if not jsonl.is_file():
        raise FileNotFoundError(f"no such file: {jsonl}")
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LmmsError(f"{jsonl}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    bad = 0
    for line in lines:
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            bad += not valid_row(row)
    if bad:
        raise LmmsError(f"{jsonl}: {bad} row(s) without image/question/answers; lmms-eval needs every row valid")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_utils.py").write_text(_UTILS.format(name=name, jsonl=jsonl, root=str(jsonl.parent),
                                                         prompt=prompt, metric=METRIC))
    q = json.dumps  # a JSON string is a YAML double-quoted scalar
    fn = f"!function {name}_utils."
    text = "\n".join([
        f"task: {name}",
        "dataset_path: json",  # datasets' json loader on the local file: no download
        "dataset_kwargs:", "  data_files:", f"    test: {q(str(jsonl))}",
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_visual: {fn}doc_to_visual", f"doc_to_text: {fn}doc_to_text",
        f"doc_to_target: {fn}doc_to_target", f"process_results: {fn}process_results",
        "generation_kwargs:", f"  max_new_tokens: {int(max_new_tokens)}", "  until: []", "  do_sample: false",
        "  temperature: 0",
        "metric_list:", f"  - metric: {METRIC}", "    aggregation: mean", "    higher_is_better: true",
        "metadata:", "  version: 0.0", f"  source: {q(str(jsonl))}", f"  prompt: {q(prompt)}", ""])
    path = out / f"{name}.yaml"
    path.write_text(text)
    return path


# -- command line --------------------------------------------------------------------------------------------------
def build_parser() -> OneLineParser:
    ap = OneLineParser(prog="python -m ett_ds.eval.lmms", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("task", help="write an lmms-eval task (YAML + utils) for a VQA JSONL")
    t.add_argument("--vqa", required=True, help="VQA JSONL: {image (relative to it), question, answers}")
    t.add_argument("--out", required=True, help="task folder (lmms-eval's --include_path)")
    t.add_argument("--name", default=TASK_NAME, help="task name (lmms-eval's --tasks)")
    t.add_argument("--prompt", default=None, help="the question's prompt, with {question} (default: evaluate's "
                   "--vqa-prompt default)")
    t.add_argument("--max-new-tokens", type=int, default=10, help="longest answer in tokens")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = write_task(args.vqa, args.out, args.name, args.prompt, args.max_new_tokens)
    print(f"wrote {path} and {path.with_name(args.name + '_utils.py')}: --tasks {args.name} --include_path "
          f"{path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

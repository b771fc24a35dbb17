"""Export: ``python -m ett_ds.export --ckpt RUN/checkpoints/STEP --out DIR [--dtype float32|bfloat16|float16]``.

Consolidates a ZeRO-3 training checkpoint (frozen parameters included; the tokenizer's EMA when the run kept one)
into one folder that transformers opens on its own, as a model with its own code (no ett_ds needed):

    from transformers import AutoModelForImageTextToText, AutoProcessor
    proc = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    inputs = proc(images=image, text="Read the text.", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

gives, greedy, the caption ``python -m ett_ds.infer caption --prompt "Read the text."`` prints. The processor fits
images as training did and lays prompts out as the stage trained (sft: training's chat layout; ``conversation=``
for longer chats); a t2i checkpoint draws images with ``model.generate_image(**proc.image_inputs(text),
cfg_scale=3.0, seed=0)`` and ``proc.postprocess_images``. The text tokenizer: ``proc.tokenizer`` or
``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``, which gives training's ids. Do not open ``DIR/llm``
with plain ``AutoTokenizer`` for a sentencepiece run: transformers 5 picks its byte-level ``Qwen2Tokenizer`` for
any ``model_type: qwen2`` folder and encodes differently.

    DIR/config.json, *_ett.py   the model (ETTConfig, auto_map) and its remote code (ett_ds/hf)
    DIR/model.safetensors.index.json  the LLM's tensors from llm/ (stored once), the rest from vision.safetensors
    DIR/vision.safetensors      vision tokenizer (float32), projector / index embedding / visual head
    DIR/processor_config.json   image size and resize mode, caption prompt, chat template, layout
    DIR/text_tokenizer.json     which text tokenizer (sentencepiece: spm.model; hf: llm/)
    DIR/generation_config.json  bos/eos/pad, greedy, image tokens and padding rows suppressed
    DIR/llm/                    the LLM alone (HF save_pretrained, tied embeddings re-tied; AutoModelForCausalLM),
                                its generation_config.json and the text tokenizer: for a sentencepiece run a
                                tokenizer.json built from the .model (open it with PreTrainedTokenizerFast),
                                checked to give the same ids; the image special tokens at training's ids; a chat
                                template rendering training's data.chat_template
    DIR/spm.model               the sentencepiece text tokenizer (when the run used one)
    DIR/tokenizer.safetensors   the vision tokenizer in the taming / IBQ key layout; its config in the metadata
    DIR/tokenizer_config.json   the same config in taming / SEED-Voken naming (ddconfig, n_embed, embed_dim), plus
                                the auto_map that sends AutoTokenizer to the text tokenizer
    DIR/projector.safetensors   and visual_head / index_embed .safetensors when the model has them
    DIR/ett_config.yaml         the resolved ett_ds config, paths pointing at the files above

A LoRA run's adapters (``model.llm.lora.r > 0``) are merged into the LLM's weights (peft's merge, W + alpha/r BA):
``llm/`` is a plain model and ``ett_config.yaml`` says ``lora.r: 0``. A tokenizer-stage checkpoint exports only the
vision tokenizer and the config. ``--dtype`` casts the LLM, the
projector and the heads; the vision tokenizer is always written in float32 (its decoder is an fp32 island and the
codebook argmax is precision-sensitive). ``python -m ett_ds.infer`` and ``evaluate`` load the folder directly.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from .checkpoint import EXPORT_CONFIG, EXTRA_PARTS, CheckpointError
from .checkpoint.safe import save_safetensors, umask_mode
from .commandline import OneLineParser, run_cli
from .config import save_config
from .data.text import chat_template_jinja
from .engine.zero3 import no_zero_init
from .hf import FILES, HERE
from .models import lora
from .models.loading import DTYPES, load_model, resolve


def save_module(module: torch.nn.Module, path: Path, dtype: torch.dtype, metadata: dict | None = None) -> None:
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    save_safetensors(sd, path, metadata)


def export(ckpt: str | Path, out: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True) -> Path:
    kind, folder = resolve(ckpt)
    if kind != "checkpoint":
        raise CheckpointError(f"{folder} is already an export; --ckpt takes a training checkpoint")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty")
    loaded = load_model(folder, "cpu")
    model, cfg = loaded.model, loaded.cfg
    out.mkdir(parents=True, exist_ok=True)

    tcfg = cfg.model.tokenizer
    layout = model.tokenizer.export_config()  # taming / SEED-Voken naming, what tokenizer_config_from_yaml reads
    save_module(model.tokenizer, out / "tokenizer.safetensors", torch.float32,
                {"format": model.tokenizer.kind, "ibq_config": json.dumps(layout),
                 "ett_tokenizer_config": json.dumps(asdict(tcfg))})
    (out / "tokenizer_config.json").write_text(json.dumps(layout, indent=1))
    tcfg.checkpoint, tcfg.checkpoint_config, tcfg.use_ema_weights = str(out / "tokenizer.safetensors"), None, False

    if model.llm is not None:
        if lora.has_adapters(model.llm):  # model.llm.lora.r > 0: W + (alpha / r) B A, a plain LLM from here on
            lora.merge(model.llm)
        cfg.model.llm.lora.r = 0
        llm = model.llm.to(dtype)
        llm.config.use_cache = True
        llm.tie_weights()  # the consolidated state dict carries both names of tied tables: make them one again
        text = loaded.text
        hf_tok = text.hf_tokenizer(chat_template_jinja(cfg.data.chat_template, cfg.num_image_tokens))
        text.check_hf(hf_tok)
        set_generation_config(llm, text)
        llm.save_pretrained(str(out / "llm"), safe_serialization=True)
        hf_tok.save_pretrained(str(out / "llm"))
        if text.kind != "hf":
            spec_path = out / "llm" / "tokenizer_config.json"
            spec = json.loads(spec_path.read_text())
            spec.update(tokenizer_class="PreTrainedTokenizerFast", ett_text_tokenizer="sentencepiece")
            spec_path.write_text(json.dumps(spec, indent=2))
        for f in (out / "llm").iterdir():
            umask_mode(f)  # save_pretrained's safetensors are 0600 otherwise
        if text.kind != "hf":
            text.save(out)  # spm.model beside the folder: what ett_ds itself loads
        for part in EXTRA_PARTS:
            module = getattr(model, part)
            if module is not None:
                save_module(module, out / f"{part}.safetensors", dtype)
        lcfg = cfg.model.llm
        lcfg.path, lcfg.init_config = str(out / "llm"), None
        lcfg.text_tokenizer = str(out / "llm") if text.kind == "hf" else str(out / "spm.model")
        lcfg.gradient_checkpointing = True  # a training default again, for runs that start from this config
        if verify:
            check_llm(out / "llm", llm)
            text.check_hf(open_tokenizer(out / "llm"))
        write_hf_model(out, model, cfg, text, dtype, layout)
    cfg.train.init_from = None
    save_config(cfg, out / EXPORT_CONFIG)
    return out


def write_hf_model(out: Path, model, cfg, text, dtype: torch.dtype, layout: dict) -> None:
    """Make ``out`` one transformers model with its own code (``trust_remote_code``; see ``ett_ds/hf``).

    Writes the remote code, ``config.json`` (ETTConfig, auto_map), ``generation_config.json``,
    ``vision.safetensors`` (vision tokenizer in float32, projector / index embedding / visual head in ``dtype``),
    ``model.safetensors.index.json`` (the LLM's tensors are read from ``llm/``'s safetensors, not written twice),
    ``processor_config.json`` (image fitting, prompt layout) and ``text_tokenizer.json`` (which text tokenizer);
    the vision layout in ``tokenizer_config.json`` gains the ``auto_map`` that sends ``AutoTokenizer`` there."""
    for name in FILES:
        shutil.copyfile(HERE / name, out / name)
        umask_mode(out / name)
    llm_dir = out / "llm"
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        llm_map = {k: f"llm/{v}" for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        with safe_open(str(llm_dir / "model.safetensors"), "pt") as f:
            llm_map = {k: "llm/model.safetensors" for k in f.keys()}
    odd = [k for k in llm_map if not k.startswith(("model.", "lm_head."))]
    if odd or not isinstance(model.llm.get_output_embeddings(), torch.nn.Linear) or \
            model.llm.get_output_embeddings().bias is not None or model.llm.base_model_prefix != "model":
        raise CheckpointError(f"{llm_dir}: the LLM is not laid out as model.* + a bias-free lm_head "
                              f"(e.g. {odd[:2]}); the transformers wrapper (ett_ds/hf) cannot hold it")
    parts = {"vision_tokenizer": (model.tokenizer, torch.float32), "projector": (model.projector, dtype),
             "index_embed": (model.index_embed, dtype), "visual_head": (model.visual_head, dtype)}
    tensors = {}
    for prefix, (module, dt) in parts.items():
        if module is not None:
            for k, v in module.state_dict().items():
                tensors[f"{prefix}.{k}"] = (v.to(dt) if v.is_floating_point() else v).contiguous()
    save_safetensors(tensors, out / "vision.safetensors", {"format": "pt"})
    weight_map = {**llm_map, **{k: "vision.safetensors" for k in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                  indent=1))
    text_config = json.loads((llm_dir / "config.json").read_text())
    vision = dict(layout, chunk_tokens=int(model.tokenizer.quantize.chunk_tokens))
    tokenizer_map = ["tokenization_ett.ETTTokenizer", None]
    config = {"model_type": "ett", "architectures": ["ETTForConditionalGeneration"],
              "auto_map": {"AutoConfig": "configuration_ett.ETTConfig",
                           "AutoModel": "modeling_ett.ETTForConditionalGeneration",
                           "AutoModelForImageTextToText": "modeling_ett.ETTForConditionalGeneration",
                           "AutoModelForCausalLM": "modeling_ett.ETTForConditionalGeneration",
                           "AutoProcessor": "processing_ett.ETTProcessor", "AutoTokenizer": tokenizer_map},
              "text_config": text_config, "vision_config": vision, "projector_depth": cfg.model.projector_depth,
              "visual_input": cfg.model.visual_input, "has_visual_head": model.visual_head is not None,
              "image_token_id": text.image_id, "boi_token_id": text.boi_id, "eoi_token_id": text.eoi_id,
              "bos_token_id": text.bos_id, "eos_token_id": text.eos_id, "pad_token_id": text.pad_id,
              "text_vocab_size": text.vocab_size, "image_size": list(cfg.data.image_size), "stage": cfg.stage,
              "tie_word_embeddings": bool(text_config.get("tie_word_embeddings", False)),
              "dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    model.llm.generation_config.save_pretrained(str(out))
    processor = {"auto_map": {"AutoProcessor": "processing_ett.ETTProcessor"},
                 "image_size": list(cfg.data.image_size), "resize_mode": cfg.data.resize_mode,
                 "num_image_tokens": cfg.num_image_tokens, "caption_prompt": cfg.data.caption_prompts[0],
                 "turn_template": cfg.data.chat_template, "layout": "chat" if cfg.stage == "sft" else "caption",
                 "max_text_tokens": cfg.data.max_text_tokens}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=1))
    if text.kind == "hf":
        settings = {"kind": "hf", "folder": "llm"}
    else:
        settings = {"kind": "sentencepiece", "model_file": "spm.model",
                    "chat_template": chat_template_jinja(cfg.data.chat_template, cfg.num_image_tokens)}
    (out / "text_tokenizer.json").write_text(json.dumps(settings, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(layout, auto_map={"AutoTokenizer": tokenizer_map}),
                                                          indent=1))
    for f in out.iterdir():
        if f.is_file():
            umask_mode(f)


def set_generation_config(llm: torch.nn.Module, text) -> None:
    """bos/eos/pad in the model config and a GenerationConfig that decodes like ``ett_ds.infer``: greedy, stops at
    eos, never emits the image tokens or the padding rows of the embedding table (ids >= the tokenizer's size)."""
    rows = llm.get_input_embeddings().weight.shape[0]
    suppress = [text.boi_id, text.eoi_id, text.image_id] + list(range(text.vocab_size, rows))
    for key, value in (("bos_token_id", text.bos_id), ("eos_token_id", text.eos_id), ("pad_token_id", text.pad_id)):
        setattr(llm.config, key, value)
    llm.generation_config = GenerationConfig(bos_token_id=text.bos_id, eos_token_id=text.eos_id,
                                             pad_token_id=text.pad_id, do_sample=False, max_new_tokens=32,
                                             suppress_tokens=suppress)


def open_tokenizer(folder: str | Path):
    """The exported text tokenizer with transformers alone.

    ``tokenizer.json`` is exact for both kinds. ``AutoTokenizer`` opens it as written for an HF-tokenizer run; for a
    sentencepiece run on a Qwen2-architecture LLM, transformers 5 ``AutoTokenizer`` always builds its own
    byte-level ``Qwen2Tokenizer`` for ``model_type: qwen2`` (whatever ``tokenizer_config.json`` says) and would
    encode differently, so the file is opened with ``PreTrainedTokenizerFast`` (the class it was saved as).
    """
    spec = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    if spec.get("ett_text_tokenizer") == "sentencepiece":
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def check_llm(folder: Path, llm: torch.nn.Module) -> None:
    """``AutoModelForCausalLM.from_pretrained(folder)`` opens the export and holds exactly the saved tensors."""
    with no_zero_init():
        reopened = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(llm.parameters()).dtype)
    tok, gen = open_tokenizer(folder), GenerationConfig.from_pretrained(str(folder))
    if gen.eos_token_id is None or tok.eos_token_id != gen.eos_token_id or not tok.chat_template:
        raise CheckpointError(f"{folder}: the exported tokenizer / generation config lack eos or a chat template")
    ours, theirs = llm.state_dict(), reopened.state_dict()
    if set(ours) != set(theirs):
        raise CheckpointError(f"{folder}: reopened LLM has different tensors ({sorted(set(ours) ^ set(theirs))[:3]})")
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    if bad:
        raise CheckpointError(f"{folder}: reopened LLM differs at {bad[:3]}")


def _main(argv: list[str]) -> int:
    ap = OneLineParser(prog="python -m ett_ds.export", description=__doc__)
    ap.add_argument("--ckpt", required=True, help="a training step folder (or a run folder: its newest step)")
    ap.add_argument("--out", required=True, help="a new (or empty) folder")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="LLM, projector and heads")
    ap.add_argument("--no-verify", action="store_true", help="skip reopening the LLM with from_pretrained")
    args = ap.parse_args(argv)
    out = Path(args.out)
    created = not out.exists()
    try:
        export(args.ckpt, out, DTYPES[args.dtype], verify=not args.no_verify)
    except BaseException:  # any failure, a bug or Ctrl-C included
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)  # no half-written export left behind
        raise
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """0, or 2 with one line for a bad checkpoint, a used --out or a file system error (disk full, permissions)."""
    return run_cli(_main, argv, also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())

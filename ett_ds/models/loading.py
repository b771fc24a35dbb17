"""Loading a trained model for inference or export: a plain ``nn.Module`` in eval mode, no DeepSpeed engine.

``load_model(path)`` accepts
- a training step folder ``RUN/checkpoints/step_XXXXXXXX`` (``complete`` + ``config.yaml``): the model is rebuilt
  from the saved config and filled from the consolidated ZeRO checkpoint (frozen parameters and the tokenizer's EMA
  included, see :func:`.weights.consolidated_state_dict`);
- a run folder ``RUN`` (its newest complete step);
- an export folder (``ett_config.yaml``, written by ``python -m ett_ds.export``): everything is read from the
  folder itself, so it still loads after the original LLM / text tokenizer paths are gone.

``require`` names what the caller needs (``llm`` for caption/chat, ``generate`` for text-to-image); a checkpoint
that cannot serve it fails with a one-line ``CheckpointError`` before any weights are read.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..checkpoint.layout import EXPORT_CONFIG, EXTRA_PARTS, MARKER, RUN_CONFIG, CheckpointError, step_folder
from ..checkpoint.safe import read_safetensors
from ..config import Config, ConfigError, config_from_dict
from ..data.text import TextTokenizer
from ..stages import STAGE_SPECS
from ..tokenizers.checkpoint import load_tokenizer_weights
from .build import build_model
from .ett import ETTModel
from .weights import consolidated_state_dict

# the dtypes a loaded model's LLM and heads may take (--dtype of infer and export, dtype= of the lmms-eval model)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: ETTModel
    text: TextTokenizer | None
    cfg: Config
    source: Path  # the step folder or export folder actually read
    kind: str  # "checkpoint" or "export"


def resolve(path: str | Path) -> tuple[str, Path]:
    """(kind, folder) for a step folder, a run folder (newest complete step) or an export folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / EXPORT_CONFIG).is_file():
        return "export", p
    step = step_folder(p)
    if step is not None and (step / RUN_CONFIG).is_file():
        return "checkpoint", step
    raise CheckpointError(f"{p} is neither an ett_ds checkpoint step folder (with '{MARKER}'), a run folder "
                          f"with complete checkpoints, nor an export folder (with {EXPORT_CONFIG})")


def read_config(kind: str, folder: Path) -> Config:
    f = folder / (EXPORT_CONFIG if kind == "export" else RUN_CONFIG)
    try:
        cfg = config_from_dict(yaml.safe_load(f.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"{f}: unreadable config ({str(e).splitlines()[0]})") from None
    # Weights come from the checkpoint itself: never re-read the tokenizer's initial checkpoint or init_from.
    cfg.model.tokenizer.checkpoint = cfg.model.tokenizer.checkpoint_config = None
    cfg.train.init_from = None
    cfg.model.llm.gradient_checkpointing = False
    return cfg


def check_kind(cfg: Config, require: str | None, source: Path) -> None:
    spec = STAGE_SPECS[cfg.stage]
    if require == "generate" and not spec.generate:
        raise CheckpointError(f"{source} was trained with stage={cfg.stage}; generate needs a t2i checkpoint")
    if require == "llm" and not spec.uses_llm:
        raise CheckpointError(f"{source} was trained with stage={cfg.stage} (a tokenizer without an LLM); "
                              "caption and chat need a checkpoint of an LLM stage")


def text_tokenizer_path(cfg: Config, kind: str, folder: Path) -> Path:
    if kind == "export":
        spm = folder / "spm.model"
        return spm if spm.is_file() else folder / "llm"
    return Path(cfg.model.llm.text_tokenizer or cfg.model.llm.path)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               require: str | None = None, text_tokenizer: str | Path | None = None) -> Loaded:
    """Rebuild the model of ``path`` and load its weights strictly. ``dtype`` casts the LLM, projector and heads
    (the vision tokenizer stays float32: its decoder is an fp32 island); ``text_tokenizer`` overrides the path
    stored in a training checkpoint's config."""
    kind, folder = resolve(path)
    cfg = read_config(kind, folder)
    check_kind(cfg, require, folder)
    tpath = None
    if STAGE_SPECS[cfg.stage].uses_llm:
        tpath = Path(text_tokenizer) if text_tokenizer else text_tokenizer_path(cfg, kind, folder)
        if not tpath.exists():
            raise CheckpointError(f"text tokenizer {tpath} (from {folder}'s config) not found; pass its new location "
                                  "or use an export folder, which carries its own copy")
        if kind == "export":
            cfg.model.llm.path, cfg.model.llm.init_config = str(folder / "llm"), None
    try:
        model, text = build_model(cfg, tpath, zero_init=False)  # the config's tokenizer checkpoint is cleared
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot rebuild the model of {folder}: {str(e).splitlines()[0]}") from None
    if kind == "export":
        _load_export(model, folder)
    else:
        _load_checkpoint(model, folder)
    model.requires_grad_(False)
    for part, module in model.parts().items():
        if part != "tokenizer" and dtype is not None:
            module.to(dtype)
    model.to(device).eval()
    return Loaded(model, text, cfg, folder, kind)


def _load_checkpoint(model: ETTModel, folder: Path) -> None:
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # zero_to_fp32's progress output
        sd = consolidated_state_dict(folder)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match its config ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{folder}: {name} has shape {tuple(t.shape)}, the config builds "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _load_export(model: ETTModel, folder: Path) -> None:
    load_tokenizer_weights(model.tokenizer, folder / "tokenizer.safetensors", use_ema=False)
    for part in EXTRA_PARTS:
        module = getattr(model, part)
        if module is None:
            continue
        f = folder / f"{part}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{folder}: {f.name} is missing (the config's stage has a {part})")
        sd = read_safetensors(f)
        own = module.state_dict()
        if set(sd) != set(own) or any(tuple(sd[k].shape) != tuple(own[k].shape) for k in own):
            raise CheckpointError(f"{f}: tensors do not match the config's {part}")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)

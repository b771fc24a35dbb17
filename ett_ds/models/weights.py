"""Moving weights between ett_ds checkpoints, models and files.

- ``consolidated_state_dict(folder)``: the full fp32 state dict of a ZeRO checkpoint step folder (frozen params
  included), with the tokenizer's EMA weights substituted when the folder carries them (stage ``tokenizer``).
- ``load_into_model(model, folder)``: initialise a (possibly ZeRO-3-partitioned) model from a previous stage.
- ``save_tokenizer``: the tokenizer in the IBQ key layout as safetensors (+ its config in the metadata).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint.layout import TOKENIZER_EMA, CheckpointError, is_complete
from ..checkpoint.safe import read_safetensors, reads_safely, save_safetensors
from ..engine import dist
from ..engine.zero3 import deepspeed_module, gathered
from .lora import fit_state_dict  # across a LoRA boundary: X.weight <-> X.base_layer.weight, merges


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 merges the ZeRO shards, reading them through :func:`.safe.safe_load` (its own
    ``torch.load(weights_only=False)`` would run whatever a pickled object asks for)."""
    z = deepspeed_module("utils.zero_to_fp32")
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete ett_ds checkpoint step folder")
    with reads_safely(z):
        sd = z.get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    ema = folder / TOKENIZER_EMA
    if ema.is_file():
        sd.update({f"tokenizer.{k}": v for k, v in read_safetensors(ema).items()})
    return sd


def load_into_model(model: torch.nn.Module, folder: Path) -> dict:
    """Copy matching tensors from a checkpoint into ``model`` (gathering partitioned params); returns a report.

    Parameters the checkpoint lacks (a part new in this stage, e.g. the visual head) keep their init; tensors the
    model lacks are ignored. A shape mismatch is an error.
    """
    sd = consolidated_state_dict(folder)
    own = dict(model.named_parameters())
    sd = fit_state_dict(sd, {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in
                             [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}, folder)
    loaded, missing = [], []
    for name, p in own.items():
        if name not in sd:
            missing.append(name)
            continue
        shape = tuple(getattr(p, "ds_shape", p.shape))
        src = sd[name]
        if tuple(src.shape) != shape:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(src.shape)}, the model has {shape}")
        with gathered([p], modify=True):
            if dist.rank() == 0 or not hasattr(p, "ds_id"):
                p.data.copy_(src.to(p.dtype))
        loaded.append(name)
    for name, b in model.named_buffers():
        if name in sd:
            b.data.copy_(sd[name].to(b.dtype))
    # tied weights (an LM head sharing the input embedding) appear once in named_parameters but under both names in
    # the checkpoint: the alias is loaded through its twin, not unused
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unexpected = sorted(set(sd) - set(own) - aliases - {n for n, _ in model.named_buffers()})
    report = {"from": str(folder), "loaded": len(loaded), "missing": missing, "unexpected": unexpected[:20]}
    ema, took = Path(folder) / TOKENIZER_EMA, None  # which tokenizer weights: the EMA ones when the folder has them
    if any(n.startswith("tokenizer.") for n in loaded):
        took = f"took tokenizer EMA weights from {ema}" if ema.is_file() else \
            f"took the raw tokenizer weights (no {TOKENIZER_EMA} in {folder})"
        report["tokenizer_weights"] = "ema" if ema.is_file() else "raw"
    if dist.is_rank0():
        print(f"[ett_ds] init_from {folder}: {len(loaded)} tensors loaded, {len(missing)} new "
              f"({', '.join(sorted({m.split('.')[0] for m in missing})) or '-'}), {len(unexpected)} unused"
              + (f" ({', '.join(unexpected[:8])}{', ...' if len(unexpected) > 8 else ''})" if unexpected else "")
              + (f"; {took}" if took else ""))
    return report


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the module's full parameters (gathered under ZeRO-3) and buffers, on CPU, on every rank."""
    params = list(module.parameters())
    with gathered(params):
        out = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
    return out


def save_tokenizer(tokenizer: torch.nn.Module, path: Path, tcfg, dtype: torch.dtype = torch.float32) -> None:
    """Collective. Rank 0 writes the taming-layout safetensors with the tokenizer config in its metadata."""
    sd = full_state_dict(tokenizer)
    try:
        if dist.is_rank0():
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            save_safetensors({k: v.contiguous() for k, v in sd.items()}, path,
                             metadata={"format": tcfg.type, "ett_tokenizer_config": json.dumps(asdict(tcfg))})
    finally:  # a failed write (a full disk) still meets the other ranks here; the caller agrees on the error
        dist.barrier()
